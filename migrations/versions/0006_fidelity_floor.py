"""fidelity floor: a job's min_fidelity and whether it accepts a degraded model

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 19:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('min_fidelity', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('accept_degraded', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('accept_degraded')
        batch_op.drop_column('min_fidelity')
