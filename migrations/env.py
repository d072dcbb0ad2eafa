"""Alembic environment: the URL comes from the caller's Config (app.core.migrate), the metadata from app.core.tables."""

from alembic import context

from app.core.db import Base, make_engine
import app.core.tables  # noqa: F401  (registers the tables on Base.metadata)

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
