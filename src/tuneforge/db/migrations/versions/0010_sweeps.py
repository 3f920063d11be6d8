"""Hyperparameter sweeps: sweep rows and Optuna's RDB tables (issue 18).

Optuna's tables (studies, trials, trial_params, ..., version_info) are created here from Optuna's own
models, and version_info gets the row Optuna would write, so Optuna never runs its own Alembic history
against this database (it would write our alembic_version table). docs/sweeps.md explains the choice.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def _optuna_tables() -> list[sa.Table]:
    from optuna.storages._rdb import models

    return list(models.BaseModel.metadata.sorted_tables)


def upgrade() -> None:
    op.create_table('sweeps',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('study_name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('finished_at', sa.BigInteger(), nullable=True),
    sa.Column('stop_reason', sa.String(length=255), nullable=True),
    sa.Column('best_job_id', sa.String(length=40), nullable=True),
    sa.Column('best_model', sa.String(length=255), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('study_name')
    )
    op.create_index('ix_sweeps_tenant_seq', 'sweeps', ['tenant_id', 'seq'])
    op.create_index('ix_sweeps_status', 'sweeps', ['status'])
    op.create_table('sweep_trials',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('sweep_id', sa.String(length=40), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('values', sa.JSON(), nullable=True),
    sa.Column('reported_step', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('finished_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
    sa.ForeignKeyConstraint(['sweep_id'], ['sweeps.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('job_id'),
    sa.UniqueConstraint('sweep_id', 'number', name='uq_sweep_trials_sweep_number')
    )
    import optuna
    from optuna.storages._rdb import models

    bind = op.get_bind()
    for table in _optuna_tables():
        table.create(bind)
    bind.execute(sa.insert(models.VersionInfoModel.__table__).values(
        version_info_id=1, schema_version=models.SCHEMA_VERSION, library_version=optuna.__version__))


def downgrade() -> None:
    bind = op.get_bind()
    tables = _optuna_tables()
    enums = {column.type.name for table in tables for column in table.columns
             if isinstance(column.type, sa.Enum) and column.type.name}
    for table in reversed(tables):
        table.drop(bind)
    if bind.dialect.name == 'postgresql':
        for name in sorted(enums):
            bind.execute(sa.text(f'DROP TYPE IF EXISTS "{name}"'))
    op.drop_table('sweep_trials')
    op.drop_index('ix_sweeps_status', table_name='sweeps')
    op.drop_index('ix_sweeps_tenant_seq', table_name='sweeps')
    op.drop_table('sweeps')
