"""A job directory's outputs sealed at rest (issue 15): one wrapped data key per job.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sealed_job_keys',
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('key_version', sa.Integer(), nullable=False),
    sa.Column('wrapped_key', sa.String(length=120), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('job_id')
    )
    op.create_index('ix_sealed_job_keys_tenant_key', 'sealed_job_keys', ['tenant_id', 'key_version'])


def downgrade() -> None:
    op.drop_index('ix_sealed_job_keys_tenant_key', table_name='sealed_job_keys')
    op.drop_table('sealed_job_keys')
