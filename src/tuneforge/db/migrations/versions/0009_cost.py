"""Cost: job cost estimates and actuals, tenant monthly budgets, priced usage records (issue 16).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_costs',
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('estimate', sa.JSON(), nullable=True),
    sa.Column('estimated_gpu_hours', sa.Float(), nullable=True),
    sa.Column('estimated_cost_usd', sa.Float(), nullable=True),
    sa.Column('estimated_wall_seconds', sa.Float(), nullable=True),
    sa.Column('actual_gpu_hours', sa.Float(), nullable=True),
    sa.Column('actual_cost_usd', sa.Float(), nullable=True),
    sa.Column('overhead_fraction', sa.Float(), nullable=True),
    sa.Column('estimate_error', sa.Float(), nullable=True),
    sa.Column('finalized_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id')
    )
    op.create_table('tenant_budgets',
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('monthly_cost_usd', sa.Float(), nullable=True),
    sa.Column('monthly_gpu_hours', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id')
    )
    op.create_table('usage_records',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('device', sa.String(length=24), nullable=False),
    sa.Column('gpu_seconds', sa.Float(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq')
    )
    op.create_index('ix_usage_records_job_id', 'usage_records', ['job_id'])
    op.create_index('ix_usage_records_tenant_day', 'usage_records', ['tenant_id', 'day'])


def downgrade() -> None:
    op.drop_index('ix_usage_records_tenant_day', table_name='usage_records')
    op.drop_index('ix_usage_records_job_id', table_name='usage_records')
    op.drop_table('usage_records')
    op.drop_table('tenant_budgets')
    op.drop_table('job_costs')
