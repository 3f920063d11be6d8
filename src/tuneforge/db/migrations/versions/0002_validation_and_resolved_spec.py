"""Uploads validated out of the request (a claim on the file row), resolved job specs, crash restarts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('files') as batch:
        # Which scheduler is validating an uploaded file, and until when (a dead one's claim expires).
        batch.add_column(sa.Column('validation_owner', sa.String(length=80), nullable=True))
        batch.add_column(sa.Column('validation_expires_at', sa.Float(), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        # What the recipe resolved ("auto" filled in), copied from resolved_spec.json by the worker.
        batch.add_column(sa.Column('resolved_spec', sa.JSON(), nullable=True))
        # Crash restarts of this job under the scheduler (checkpoint.max_restarts bounds them).
        batch.add_column(sa.Column('restarts', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('restarts')
        batch.drop_column('resolved_spec')
    with op.batch_alter_table('files') as batch:
        batch.drop_column('validation_expires_at')
        batch.drop_column('validation_owner')
