"""Alembic migrations; `app.migrate` runs them on SQLite and PostgreSQL alike."""
