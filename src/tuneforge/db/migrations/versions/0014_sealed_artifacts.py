"""The artifact folder sealed at rest (issue 15): one row per tenant and content, holding the wrapped data key.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 19:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('sealed_blobs',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('key_version', sa.Integer(), nullable=False),
    sa.Column('wrapped_key', sa.String(length=120), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('touched_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'sha256', name='uq_sealed_blobs_tenant_sha256')
    )
    op.create_index('ix_sealed_blobs_tenant_key', 'sealed_blobs', ['tenant_id', 'key_version'])
    op.create_index(op.f('ix_sealed_blobs_touched_at'), 'sealed_blobs', ['touched_at'])


def downgrade() -> None:
    op.drop_index(op.f('ix_sealed_blobs_touched_at'), table_name='sealed_blobs')
    op.drop_index('ix_sealed_blobs_tenant_key', table_name='sealed_blobs')
    op.drop_table('sealed_blobs')
