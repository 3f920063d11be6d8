"""Security: key scopes, expiry and hints; tenant quotas; the shared request token buckets; the
append-only audit log (UPDATE and DELETE refused by triggers).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

APPEND_ONLY = "audit_log is append-only"


def upgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        batch.add_column(sa.Column('max_active_jobs', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('max_storage_bytes', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))
    with op.batch_alter_table('api_keys') as batch:
        # Keys made before scopes existed keep what they could do: everything, and admin if they were.
        batch.add_column(sa.Column('scopes', sa.String(length=64), nullable=False, server_default='read jobs files'))
        batch.add_column(sa.Column('expires_at', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('hint', sa.String(length=16), nullable=True))
    op.execute(sa.text("UPDATE api_keys SET scopes = 'read jobs files admin' WHERE admin"))
    op.create_table('rate_limit_buckets',
    sa.Column('key_id', sa.String(length=40), nullable=False),
    sa.Column('tokens', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key_id')
    )
    op.create_table('audit_log',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=True),
    sa.Column('key_id', sa.String(length=40), nullable=True),
    sa.Column('action', sa.String(length=160), nullable=False),
    sa.Column('object_id', sa.String(length=255), nullable=True),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    op.create_index('ix_audit_log_tenant_seq', 'audit_log', ['tenant_id', 'seq'])
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f"""CREATE FUNCTION tuneforge_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$""")
        op.execute("CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
                   "FOR EACH ROW EXECUTE FUNCTION tuneforge_audit_log_append_only()")
        op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
                   "FOR EACH STATEMENT EXECUTE FUNCTION tuneforge_audit_log_append_only()")
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
                       f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END")


def downgrade() -> None:
    op.drop_index('ix_audit_log_tenant_seq', table_name='audit_log')
    op.drop_table('audit_log')  # its triggers go with it
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP FUNCTION IF EXISTS tuneforge_audit_log_append_only()")
    op.drop_table('rate_limit_buckets')
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_column('hint')
        batch.drop_column('expires_at')
        batch.drop_column('scopes')
    with op.batch_alter_table('tenants') as batch:
        batch.drop_column('requests_per_minute')
        batch.drop_column('max_storage_bytes')
        batch.drop_column('max_active_jobs')
