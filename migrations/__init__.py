"""Alembic migrations; `app.core.migrate` runs them on SQLite and PostgreSQL alike."""
