"""Crypto-shredding made permanent (issue 15): the holders (files, upload parts, the jobs whose registered files a
model version or an export lists) that had a tenant's bytes when their key was shredded, so the same bytes sealed
again under a new key never open for them.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('shredded_holders',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=64), nullable=False),
    sa.Column('blob_id', sa.String(length=40), nullable=False),
    sa.Column('key_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('tenant_id', 'sha256', 'holder', name='uq_shredded_holders_tenant_sha256_holder')
    )


def downgrade() -> None:
    op.drop_table('shredded_holders')
