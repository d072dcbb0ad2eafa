"""job tuning

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 08:41:23.575336
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tune', sa.JSON(), nullable=True))
        batch_op.alter_column('recipe', existing_type=sa.JSON(), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('recipe', existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column('tune')

