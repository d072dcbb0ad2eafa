"""job deletion and queue heartbeats: when a job's outputs were deleted, and when a worker last served each queue

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-20 10:00:00
"""

import sqlalchemy as sa
from alembic import op

import app.core.db

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', app.core.db.UTCDateTime(timezone=True), nullable=True))
    op.create_table('queue_heartbeats',
    sa.Column('queue', sa.String(length=32), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=False),
    sa.Column('seen_at', app.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('queue')
    )


def downgrade() -> None:
    op.drop_table('queue_heartbeats')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
