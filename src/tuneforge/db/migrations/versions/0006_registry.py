"""Model registry: model names, immutable versions with lineage, aliases and tags (issue 13).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.String(length=255), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('manifest_sha256', sa.String(length=64), nullable=False),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('lineage', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('deleted_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
    sa.ForeignKeyConstraint(['model_id'], ['models.id']),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('model_id'),
    sa.UniqueConstraint('tenant_id', 'name', 'version', name='uq_model_versions_tenant_name_version')
    )
    op.create_index('ix_model_versions_manifest_sha256', 'model_versions', ['manifest_sha256'])
    op.create_table('model_aliases',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.String(length=40), nullable=False),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
    sa.ForeignKeyConstraint(['version_id'], ['model_versions.id']),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('tenant_id', 'name', 'alias', name='uq_model_aliases_tenant_name_alias')
    )
    op.create_table('model_tags',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('version_id', sa.String(length=40), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=512), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('version_id', 'key', name='uq_model_tags_version_key')
    )
    op.create_table('registered_base_models',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('manifest_sha256', sa.String(length=64), nullable=False),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('name')
    )
    op.create_table('registry_blobs',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('owner', sa.String(length=80), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    op.create_index('ix_registry_blobs_owner', 'registry_blobs', ['owner'])
    op.create_index('ix_registry_blobs_sha256', 'registry_blobs', ['sha256'])


def downgrade() -> None:
    op.drop_index('ix_registry_blobs_sha256', table_name='registry_blobs')
    op.drop_index('ix_registry_blobs_owner', table_name='registry_blobs')
    op.drop_table('registry_blobs')
    op.drop_table('registered_base_models')
    op.drop_table('model_tags')
    op.drop_table('model_aliases')
    op.drop_index('ix_model_versions_manifest_sha256', table_name='model_versions')
    op.drop_table('model_versions')
