"""Artifact storage: object-store locations and encryption at rest (tenant keys, wrapped data keys) (issues 13, 15).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_keys',
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('retired_at', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('tenant_id', 'version')
    )
    op.create_table('stored_objects',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('location', sa.String(length=512), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('encrypted', sa.Boolean(), nullable=False),
    sa.Column('key_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_key', sa.String(length=120), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'address', name='uq_stored_objects_tenant_address')
    )
    op.create_index('ix_stored_objects_tenant_key', 'stored_objects', ['tenant_id', 'key_version'])
    op.create_table('object_links',
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('object_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['object_id'], ['stored_objects.id']),
    sa.PrimaryKeyConstraint('owner', 'name')
    )
    op.create_index(op.f('ix_object_links_object_id'), 'object_links', ['object_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_object_links_object_id'), table_name='object_links')
    op.drop_table('object_links')
    op.drop_index('ix_stored_objects_tenant_key', table_name='stored_objects')
    op.drop_table('stored_objects')
    op.drop_table('tenant_keys')
