"""Exports of fine-tuned models as API calls (issue 13): one row per export, naming the job that makes it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 16:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('model_exports',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('model_id', sa.String(length=255), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('job_id')
    )
    op.create_index('ix_model_exports_tenant_model', 'model_exports', ['tenant_id', 'model_id', 'seq'])


def downgrade() -> None:
    op.drop_index('ix_model_exports_tenant_model', table_name='model_exports')
    op.drop_table('model_exports')
