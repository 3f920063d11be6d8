"""OpenAI's Uploads API: multi-part uploads and their parts (issue 13).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('uploads',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('mime_type', sa.String(length=127), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('received_bytes', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('file_id', sa.String(length=40), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    op.create_index('ix_uploads_tenant_seq', 'uploads', ['tenant_id', 'seq'])
    op.create_index('ix_uploads_status_expires', 'uploads', ['status', 'expires_at'])
    op.create_table('upload_parts',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('upload_id', sa.String(length=40), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['upload_id'], ['uploads.id'], ),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    op.create_index('ix_upload_parts_upload_id', 'upload_parts', ['upload_id'])
    op.create_index('ix_upload_parts_sha256', 'upload_parts', ['sha256'])


def downgrade() -> None:
    op.drop_index('ix_upload_parts_sha256', table_name='upload_parts')
    op.drop_index('ix_upload_parts_upload_id', table_name='upload_parts')
    op.drop_table('upload_parts')
    op.drop_index('ix_uploads_status_expires', table_name='uploads')
    op.drop_index('ix_uploads_tenant_seq', table_name='uploads')
    op.drop_table('uploads')
