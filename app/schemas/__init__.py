"""Pydantic schemas shared by the API and the workers (no torch here)."""
