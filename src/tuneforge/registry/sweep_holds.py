"""What a running sweep holds: the models and files its future trials will name, which cannot be deleted
while it runs (each trial is submitted later, from the sweep's stored spec, so no job names them yet).

A fine-tuned model, a registered base model or a data file that a running sweep uses answers 409 naming the
sweep, as one a job not finished yet uses does; cancel the sweep (or let it end) first.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from tuneforge.db import sweeps as sweep_rows
from tuneforge.spec.job import JobSpec
from tuneforge.spec.sweep import SweepSpec


def sweeps_using_model(session: Session, *, tenant_id: str | None, names: Callable[[JobSpec], bool]) -> list[str]:
    """"sweep ID (running) uses it" for each running sweep (of tenant_id; of every tenant when None) whose base
    or a value of whose space names the model (names(job spec) tells): every model a trial can name is named
    by one of the spec's edge specs (SweepSpec.edge_specs)."""
    reasons = []
    for sweep in sweep_rows.running_sweeps(session, tenant_id=tenant_id):
        try:
            spec = SweepSpec.model_validate(sweep.spec)
        except ValueError:  # a spec this version cannot read: the driver cannot run it either
            continue
        if any(names(job_spec) for _, job_spec in spec.edge_specs()):
            owner = f" of tenant {sweep.tenant_id}" if tenant_id is None else ""
            reasons.append(f"sweep {sweep.id} (running){owner} uses it")
    return reasons


def sweeps_using_file(session: Session, *, tenant_id: str, file_id: str) -> list[str]:
    """"sweep ID (running) trains on it" for each running sweep of the tenant whose data is the file (a sweep's
    data is fixed: base.dataset.path and validation_path, pinned to file ids at creation)."""
    reasons = []
    for sweep in sweep_rows.running_sweeps(session, tenant_id=tenant_id):
        dataset = ((sweep.spec or {}).get("base") or {}).get("dataset") or {}
        if file_id in (dataset.get("path"), dataset.get("validation_path")):
            reasons.append(f"sweep {sweep.id} (running) trains on it")
    return reasons
