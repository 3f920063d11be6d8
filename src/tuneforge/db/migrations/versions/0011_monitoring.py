"""Monitoring (issue 16): no schema change. Alerts and system samples are job events (job_events, job_metrics),
and /metrics reads them at scrape time; the revision keeps the agreed chain 0006..0012.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # nothing to create: see the docstring


def downgrade() -> None:
    pass  # nothing to drop
