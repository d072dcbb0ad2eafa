"""input specs: a model's default input specs (given at upload) and the specs a job runs with

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 14:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('input_specs', sa.JSON(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('input_specs', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('input_specs')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('input_specs')
