"""Evals, their runs and the runs' output items, scoped to a tenant (session first).

A run is a row in `jobs` (method eval) plus its `eval_runs` row; the job's status is the run's. Output
items are copied in once, when the run succeeds, by the worker (record_run_result).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import Eval, EvalOutputItem, EvalRun, Job

EVAL, EVAL_RUN, OUTPUT_ITEM = "eval_", "evalrun_", "outputitem_"


def create_eval(session: Session, *, tenant_id: str, name: str, data_source_config: dict[str, Any],
                testing_criteria: list[dict[str, Any]], metadata: dict[str, str] | None) -> Eval:
    row = Eval(id=new_id(EVAL), tenant_id=tenant_id, name=name, data_source_config=data_source_config,
               testing_criteria=testing_criteria, metadata_=metadata, created_at=now())
    session.add(row)
    session.flush()
    return row


def get_eval(session: Session, *, tenant_id: str, eval_id: str) -> Eval | None:
    """The tenant's live eval; another tenant's id answers None, exactly like a missing one."""
    return session.scalar(select(Eval).where(Eval.id == eval_id, Eval.tenant_id == tenant_id,
                                             Eval.deleted_at.is_(None)))


def list_evals(session: Session, *, tenant_id: str, limit: int, after: str | None = None,
               order: str = "asc") -> tuple[list[Eval], bool]:
    query = select(Eval).where(Eval.tenant_id == tenant_id, Eval.deleted_at.is_(None))
    return keyset_page(session, query, key=Eval.seq, id_column=Eval.id, after=after, limit=limit,
                       scope=Eval.tenant_id == tenant_id, descending=order == "desc")


def update_eval(session: Session, *, row: Eval, name: str | None, metadata: dict[str, str] | None) -> Eval:
    if name is not None:
        row.name = name
    if metadata is not None:
        row.metadata_ = metadata
    session.flush()
    return row


def delete_eval(session: Session, *, row: Eval) -> None:
    """Mark the eval deleted (its runs go with it; a run still going is cancelled by the caller)."""
    stamp = now()
    row.deleted_at = stamp
    for run in session.scalars(select(EvalRun).where(EvalRun.eval_id == row.id, EvalRun.deleted_at.is_(None))):
        run.deleted_at = stamp
    session.flush()


def create_run(session: Session, *, tenant_id: str, eval_id: str, job_id: str, name: str, model: str | None,
               data_source: dict[str, Any], metadata: dict[str, str] | None) -> EvalRun:
    row = EvalRun(id=new_id(EVAL_RUN), eval_id=eval_id, tenant_id=tenant_id, job_id=job_id, name=name, model=model,
                  data_source=data_source, metadata_=metadata, created_at=now())
    session.add(row)
    session.flush()
    return row


def get_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> tuple[EvalRun, Job] | None:
    """The run of this tenant's eval with its job; None for a missing one, another eval's or another tenant's."""
    found = session.execute(
        select(EvalRun, Job).join(Job, Job.id == EvalRun.job_id)
        .where(EvalRun.id == run_id, EvalRun.eval_id == eval_id, EvalRun.tenant_id == tenant_id,
               EvalRun.deleted_at.is_(None))
    ).first()
    return None if found is None else (found[0], found[1])


def list_runs(session: Session, *, tenant_id: str, eval_id: str, limit: int, after: str | None = None,
              order: str = "asc", statuses: tuple[str, ...] | None = None) -> tuple[list[tuple[EvalRun, Job]], bool]:
    """(run, job) pairs of one eval; statuses filters on the job statuses a run status stands for."""
    query = (select(EvalRun, Job).join(Job, Job.id == EvalRun.job_id)
             .where(EvalRun.eval_id == eval_id, EvalRun.tenant_id == tenant_id, EvalRun.deleted_at.is_(None)))
    if statuses is not None:
        query = query.where(Job.status.in_(statuses))
    descending = order == "desc"
    if after:
        anchor = session.scalar(select(EvalRun.seq).where(EvalRun.id == after, EvalRun.eval_id == eval_id,
                                                          EvalRun.tenant_id == tenant_id))
        if anchor is not None:
            query = query.where(EvalRun.seq < anchor if descending else EvalRun.seq > anchor)
    rows = session.execute(query.order_by(EvalRun.seq.desc() if descending else EvalRun.seq).limit(limit + 1)).all()
    return [(run, job) for run, job in rows[:limit]], len(rows) > limit


def delete_run(session: Session, *, row: EvalRun) -> None:
    row.deleted_at = now()
    session.flush()


def run_of_job(session: Session, *, job_id: str) -> EvalRun | None:
    return session.scalar(select(EvalRun).where(EvalRun.job_id == job_id))


def eval_run_jobs():
    """The ids of jobs that are eval runs (the fine-tuning job endpoints leave them out)."""
    return select(EvalRun.job_id)


def record_run_result(session: Session, *, job_id: str, result: dict[str, Any], items: list[dict[str, Any]]) -> bool:
    """A succeeded run's counts and output items, in the transaction that marks its job succeeded; False
    when the job is no eval run or already has them."""
    run = run_of_job(session, job_id=job_id)
    if run is None or run.result is not None:
        return False
    run.result = result
    stamp = now()
    session.add_all(EvalOutputItem(
        id=new_id(OUTPUT_ITEM), run_id=run.id, datasource_item_id=item["index"], status=item["status"],
        created_at=stamp, datasource_item=item["item"], sample=item["sample"], results=item["results"],
    ) for item in items)
    session.flush()
    return True


def list_output_items(session: Session, *, run_id: str, limit: int, after: str | None = None, order: str = "asc",
                      status: str | None = None) -> tuple[list[EvalOutputItem], bool]:
    """The run's output items in item order; the caller has checked the run is the tenant's."""
    query = select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
    if status is not None:
        query = query.where(EvalOutputItem.status == status)
    return keyset_page(session, query, key=EvalOutputItem.seq, id_column=EvalOutputItem.id, after=after, limit=limit,
                       scope=EvalOutputItem.run_id == run_id, descending=order == "desc")


def get_output_item(session: Session, *, run_id: str, item_id: str) -> EvalOutputItem | None:
    return session.scalar(select(EvalOutputItem).where(EvalOutputItem.run_id == run_id, EvalOutputItem.id == item_id))
