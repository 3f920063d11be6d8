"""The dataset registry (issue 13): named, immutable versions of uploaded files, their aliases and tags, and
the dataset version each job named for its training or validation file.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 14:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('dataset_versions',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('file_id', sa.String(length=40), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('format', sa.String(length=32), nullable=True),
    sa.Column('examples', sa.Integer(), nullable=False),
    sa.Column('source_version_id', sa.String(length=40), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('deleted_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['file_id'], ['files.id']),
    sa.ForeignKeyConstraint(['source_version_id'], ['dataset_versions.id']),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'name', 'version', name='uq_dataset_versions_tenant_name_version')
    )
    op.create_index('ix_dataset_versions_tenant_file', 'dataset_versions', ['tenant_id', 'file_id'])
    op.create_table('dataset_aliases',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.String(length=40), nullable=False),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
    sa.ForeignKeyConstraint(['version_id'], ['dataset_versions.id']),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('tenant_id', 'name', 'alias', name='uq_dataset_aliases_tenant_name_alias')
    )
    op.create_table('dataset_tags',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('version_id', sa.String(length=40), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=512), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['dataset_versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('version_id', 'key', name='uq_dataset_tags_version_key')
    )
    op.create_table('job_datasets',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('version_id', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
    sa.ForeignKeyConstraint(['version_id'], ['dataset_versions.id']),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('job_id', 'role', name='uq_job_datasets_job_role')
    )


def downgrade() -> None:
    op.drop_table('job_datasets')
    op.drop_table('dataset_tags')
    op.drop_table('dataset_aliases')
    op.drop_index('ix_dataset_versions_tenant_file', table_name='dataset_versions')
    op.drop_table('dataset_versions')
