"""An index for the scheduler's validator: it looks for uploaded files every poll.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_files_status_seq', 'files', ['status', 'seq'])


def downgrade() -> None:
    op.drop_index('ix_files_status_seq', table_name='files')
