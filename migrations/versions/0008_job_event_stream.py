"""job event stream: job_events gets a kind and a data object (progress reports beside status changes), an index
for reading one job's events in order, and AUTOINCREMENT ids on SQLite (event ids are never handed out twice)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-20 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def _batch(autoincrement: bool):
    """SQLite gets AUTOINCREMENT only by copying the table; PostgreSQL's sequence never reuses ids anyway."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    return op.batch_alter_table('job_events', schema=None, recreate="always" if sqlite else "auto",
                                table_kwargs={"sqlite_autoincrement": autoincrement})


def upgrade() -> None:
    with _batch(True) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='status', nullable=False))
        batch_op.add_column(sa.Column('data', sa.JSON(), nullable=True))
        batch_op.drop_index('ix_job_events_job_id')
        batch_op.create_index('ix_job_events_job_id_id', ['job_id', 'id'], unique=False)


def downgrade() -> None:
    with _batch(False) as batch_op:
        batch_op.drop_index('ix_job_events_job_id_id')
        batch_op.create_index('ix_job_events_job_id', ['job_id'], unique=False)
        batch_op.drop_column('data')
        batch_op.drop_column('kind')
