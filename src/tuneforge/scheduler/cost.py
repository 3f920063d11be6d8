"""Cost accounting and budgets: a job's estimate at submission, the priced usage a worker records while it
runs (so budgets are current within a heartbeat), the budget checks that refuse or stop a job, and the
actual cost, platform overhead and estimate error recorded once it finished.

Budgets: a job's own (resources.max_cost_usd / max_gpu_hours) and its tenant's per UTC month. A job is
refused at submission when its estimate would pass one; a running job is stopped (SIGTERM: the recipe
checkpoints first) at the heartbeat that sees one spent, and fails with the code budget_exceeded.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db import costs as cost_rows
from tuneforge.db import files as file_rows
from tuneforge.db.job_events import list_metrics
from tuneforge.db.tables import Job, JobCost
from tuneforge.planner.cost import (
    CHARS_PER_TOKEN,
    TEMPLATE_TOKENS_PER_TURN,
    CostEstimate,
    Generation,
    Rate,
    combined_estimate,
    estimate_cost,
    generation_tokens,
    packs,
    price_table,
    training_tokens,
)
from tuneforge.planner.errors import PlannerError
from tuneforge.spec.api import TERMINAL_STATUSES, CostObject
from tuneforge.spec.job import JobSpec

JUDGE_INSTRUCTION_TOKENS = 32  # "Grade the response. Reply with only a number from 1 to 7 ..."
DEFAULT_ANY_GPU = "h100-80gb"  # what the planner plans gpu_type any on when no live worker says more


def utc_day(when_s: float) -> str:
    return dt.datetime.fromtimestamp(when_s, dt.timezone.utc).strftime("%Y-%m-%d")


def month_start(when_s: float) -> str:
    return utc_day(when_s)[:8] + "01"


def split_by_day(start_s: float, end_s: float) -> list[tuple[str, float]]:
    """[(UTC day, seconds)] of the span [start_s, end_s): a run over midnight counts on both days."""
    spans = []
    while end_s > start_s:
        day = dt.datetime.fromtimestamp(start_s, dt.timezone.utc).date()
        midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp()
        stop = min(end_s, midnight)
        spans.append((day.isoformat(), stop - start_s))
        start_s = stop
    return spans


def tenant_rates(tenant_id: str) -> tuple[list[Rate], str | None]:
    """What a device-hour costs the tenant, per device type; or why the operator's price table is unreadable."""
    try:
        return price_table().rates(tenant_id), None
    except PlannerError as exc:
        return [], str(exc)


# ---- before the job: the estimate and the budgets it must fit -----------------------------------------------


def priced_device(spec: JobSpec, inventories: list[dict[str, Any]]) -> str:
    """The device a job will run on: its gpu_type, or for `any` the first type a live worker has."""
    wanted = spec.resources.gpu_type
    if wanted != "any":
        return wanted
    types = [node["gpu_type"] for inventory in inventories for node in inventory["nodes"] if node.get("gpus")]
    return next((t for t in types if t != "cpu"), types[0] if types else DEFAULT_ANY_GPU)


def estimate_job(session: Session, *, tenant_id: str, spec: JobSpec, inventories: list[dict[str, Any]]
                 ) -> CostEstimate | None:
    """The job's GPU-hours, wall time and cost at the tenant's price, from its training file's statistics and
    the planner; None when the file is not validated yet, the method is not priced, or the model unknown."""
    from tuneforge.planner.plan import plan_job

    ids = [i for i in (spec.dataset.path, spec.dataset.validation_path) if i]
    files = file_rows.files_by_id(session, file_ids=ids)
    training = files.get(spec.dataset.path)
    report = (training.report or {}) if training is not None else {}
    validation = files.get(spec.dataset.validation_path) if spec.dataset.validation_path else None
    validation_examples = int((validation.report or {}).get("examples") or 0) if validation is not None else None
    device = priced_device(spec, inventories)
    priced = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu_type": device})})
    stats = report.get("stats") or {}
    # A VLM's FLOPs at the file's images per example (admission plans the fit at the worst case).
    images = math.ceil((stats.get("images") or 0) / max(1, int(report.get("examples") or 1)))
    try:
        plan = plan_job(priced, images_per_example=images or None)
    except PlannerError:
        return None
    vision = plan.model.vision
    counted = training_tokens(spec, examples=int(report.get("examples") or 0), stats=stats,
                              packed=packs(spec, plan.model), row_cap=plan.model.packed_row_cap(),
                              validation_examples=validation_examples, image_tokens=vision.image_tokens if vision else 0)
    if counted is None:
        return None
    return estimate_cost(plan, tokens=counted.tokens, steps=counted.steps, rate=price_table().rate(device, tenant_id),
                         basis=counted.basis)


class LocalJudge(NamedTuple):
    """A model grader an eval run serves itself (no endpoint): what its prompt and reply cost."""
    name: str
    base_model: str
    input_characters: int  # of its input messages, before the item and the answer are filled in
    max_tokens: int


def estimate_eval_run(*, tenant_id: str, spec: JobSpec, inventories: list[dict[str, Any]], items: int,
                      characters: int, judges: list[LocalJudge]) -> CostEstimate | None:
    """An eval run's device time and cost at the tenant's price, planned as a job's: its model reads each item's
    prompt and writes up to max_completion_tokens, then each judge served here reads its instructions, the item
    and the answer and writes up to its max tokens. Tokens are characters / 4 (of the items as stored, JSON
    included: an upper bound) plus the template's markers. None when there is nothing to price (no items
    counted yet, or a jsonl run whose graders load no model) or the planner does not know a model; a judge
    behind an endpoint is that endpoint's bill, not this server's."""
    run = spec.eval_run
    if run is None or items < 1:
        return None
    item_tokens = characters / items / CHARS_PER_TOKEN
    work = []
    if run.model:
        template = run.input_messages or []
        prompt = (item_tokens + sum(len(m.content) for m in template) / CHARS_PER_TOKEN
                  + TEMPLATE_TOKENS_PER_TURN * max(1, len(template)))
        work.append((spec.model.base_model, Generation("the model", items, prompt, run.max_completion_tokens)))
    answer = run.max_completion_tokens if run.model else 0  # a jsonl run's answers are among its items' characters
    for judge in judges:
        # its input messages and the grader's one-line instruction (evaluation/graders.py), the item and the answer
        prompt = (item_tokens + answer + judge.input_characters / CHARS_PER_TOKEN
                  + JUDGE_INSTRUCTION_TOKENS + TEMPLATE_TOKENS_PER_TURN * 2)
        work.append((judge.base_model, Generation(f"judge {judge.name}", items, prompt, judge.max_tokens)))
    if not work:
        return None
    from tuneforge.planner.plan import plan_job

    device = priced_device(spec, inventories)
    rate = price_table().rate(device, tenant_id)
    parts = []
    for base_model, generation in work:
        priced = spec.model_copy(update={"model": spec.model.model_copy(update={"base_model": base_model}),
                                         "resources": spec.resources.model_copy(update={"gpu_type": device})})
        try:
            plan = plan_job(priced)
        except PlannerError:
            return None
        tokens, basis = generation_tokens(generation)
        parts.append(estimate_cost(plan, tokens=tokens, rate=rate, basis=basis))
    return combined_estimate(parts)


def job_budget_problem(spec: JobSpec, estimate: CostEstimate | None) -> tuple[str, str] | None:
    """(message, param) when the job's estimate is over its own budget."""
    resources = spec.resources
    if estimate is None or estimate.gpu_hours is None:
        return None
    if resources.max_cost_usd is not None and estimate.cost_usd > resources.max_cost_usd:
        return (f"the job is estimated at ${estimate.cost_usd:,.4f} ({estimate.gpu_hours:,.4f} {estimate.device} hours "
                f"at ${estimate.price_per_gpu_hour:g}/h), over its resources.max_cost_usd ${resources.max_cost_usd:g}",
                "tuneforge.resources.max_cost_usd")
    if resources.max_gpu_hours is not None and estimate.gpu_hours > resources.max_gpu_hours:
        return (f"the job is estimated at {estimate.gpu_hours:,.4f} GPU-hours, over its resources.max_gpu_hours "
                f"{resources.max_gpu_hours:g}", "tuneforge.resources.max_gpu_hours")
    return None


def tenant_budget_problem(session: Session, *, tenant_id: str, estimate: CostEstimate | None, now_s: float
                          ) -> str | None:
    """Why the tenant's monthly budget cannot take this job: spent already, or spent by its estimate."""
    budget = cost_rows.get_budget(session, tenant_id=tenant_id)
    if budget is None or (budget.monthly_cost_usd is None and budget.monthly_gpu_hours is None):
        return None
    seconds, cost = cost_rows.tenant_usage_since(session, tenant_id=tenant_id, first_day=month_start(now_s))
    month = month_start(now_s)[:7]
    extra_cost = estimate.cost_usd if estimate is not None and estimate.cost_usd is not None else 0.0
    extra_hours = estimate.gpu_hours if estimate is not None and estimate.gpu_hours is not None else 0.0
    if budget.monthly_cost_usd is not None and cost + extra_cost > budget.monthly_cost_usd:
        return (f"tenant {tenant_id!r} has used ${cost:,.4f} of its ${budget.monthly_cost_usd:g} budget for {month}"
                + (f" and this job is estimated at ${extra_cost:,.4f}" if extra_cost else "")
                + ": wait for next month or ask an admin to raise monthly_cost_usd")
    if budget.monthly_gpu_hours is not None and seconds / 3600 + extra_hours > budget.monthly_gpu_hours:
        return (f"tenant {tenant_id!r} has used {seconds / 3600:,.4f} of its {budget.monthly_gpu_hours:g} GPU-hours "
                f"for {month}" + (f" and this job is estimated at {extra_hours:,.4f}" if extra_hours else "")
                + ": wait for next month or ask an admin to raise monthly_gpu_hours")
    return None


def record_estimate(session: Session, *, job: Job, estimate: CostEstimate | None) -> None:
    cost_rows.record_estimate(session, job_id=job.id, tenant_id=job.tenant_id,
                              estimate=estimate.to_dict() if estimate is not None else None)


# ---- while it runs: priced usage and the budgets it may spend --------------------------------------------------


def record_usage(session: Session, *, job_id: str, tenant_id: str, device: str, devices: int, start_s: float,
                 end_s: float) -> None:
    """Device time of one run's span [start_s, end_s) on `devices` devices, priced at the tenant's rate now."""
    if end_s <= start_s or devices < 1:
        return
    rate = price_table().rate(device, tenant_id).price_per_hour
    for day, seconds in split_by_day(start_s, end_s):
        gpu_seconds = seconds * devices
        cost_rows.add_usage(session, tenant_id=tenant_id, job_id=job_id, day=day, device=device,
                            gpu_seconds=gpu_seconds, cost_usd=gpu_seconds / 3600 * rate)


def running_budget_problem(session: Session, *, job_id: str, tenant_id: str, spec: JobSpec, now_s: float
                           ) -> str | None:
    """Why a running job must stop now: its own budget or its tenant's month is spent."""
    seconds, cost = cost_rows.job_usage(session, job_id=job_id)
    resources = spec.resources
    if resources.max_cost_usd is not None and cost >= resources.max_cost_usd:
        return f"the job has cost ${cost:,.4f}, its resources.max_cost_usd is ${resources.max_cost_usd:g}"
    if resources.max_gpu_hours is not None and seconds / 3600 >= resources.max_gpu_hours:
        return f"the job has used {seconds / 3600:,.4f} GPU-hours, its resources.max_gpu_hours is {resources.max_gpu_hours:g}"
    budget = cost_rows.get_budget(session, tenant_id=tenant_id)
    if budget is None:
        return None
    month_seconds, month_cost = cost_rows.tenant_usage_since(session, tenant_id=tenant_id, first_day=month_start(now_s))
    month = month_start(now_s)[:7]
    if budget.monthly_cost_usd is not None and month_cost >= budget.monthly_cost_usd:
        return f"tenant {tenant_id!r} has spent its ${budget.monthly_cost_usd:g} budget for {month} (${month_cost:,.4f})"
    if budget.monthly_gpu_hours is not None and month_seconds / 3600 >= budget.monthly_gpu_hours:
        return (f"tenant {tenant_id!r} has used its {budget.monthly_gpu_hours:g} GPU-hours for {month} "
                f"({month_seconds / 3600:,.4f})")
    return None


# ---- after: actual cost, overhead, estimate error ------------------------------------------------------------


def step_seconds(session: Session, *, job_id: str, logging_steps: int) -> float | None:
    """Seconds the job spent in training steps, from its metrics: the tokens between two logged steps over
    the logged tokens/s (a resumed run's steps count again: they ran again)."""
    total, previous = 0.0, None
    for row in list_metrics(session, job_id=job_id):
        values = row.values or {}
        rate, seen = values.get("tokens_per_second"), values.get("tokens_seen")
        if not rate or seen is None or row.step < 1:
            continue
        if previous is not None and row.step > previous[0] and seen > previous[1]:
            tokens = seen - previous[1]
        else:  # the first logged step, or the first after a resume: the steps since the last log
            tokens = seen / row.step * min(row.step, logging_steps)
        total += tokens / rate
        previous = (row.step, seen)
    return total if previous is not None else None


def overhead_fraction(session: Session, *, job: Job) -> float | None:
    """The share of the job's run time (wall time its processes ran, queueing excluded) outside training steps."""
    devices = max(1, (job.num_gpus or 1) * (job.num_nodes or 1))
    run_seconds = (job.gpu_seconds or 0.0) / devices
    spec = JobSpec.model_validate(job.spec)
    steps = step_seconds(session, job_id=job.id, logging_steps=spec.training.logging_steps)
    if steps is None or run_seconds <= 0:
        return None
    return max(0.0, min(1.0, 1 - steps / run_seconds))


def finalize(session: Session, *, job: Job) -> None:
    """A finished job's actual GPU-hours and cost, overhead and estimate error, stored with the job."""
    seconds, cost = cost_rows.job_usage(session, job_id=job.id)
    row = cost_rows.get_job_cost(session, job_id=job.id)
    hours = seconds / 3600
    error = None
    if row is not None and row.estimated_gpu_hours is not None and hours > 0:
        error = (row.estimated_gpu_hours - hours) / hours
    cost_rows.record_actuals(session, job_id=job.id, tenant_id=job.tenant_id, gpu_hours=hours, cost_usd=cost,
                             overhead_fraction=overhead_fraction(session, job=job), estimate_error=error)


def finalize_if_finished(session: Session, *, job_id: str) -> None:
    """After a worker's last word on a job: record its actuals if that finished it."""
    session.flush()
    job = session.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar_one_or_none()
    if job is not None and job.status in TERMINAL_STATUSES:
        finalize(session, job=job)


def cost_object(session: Session, job: Job, row: JobCost | None = None) -> CostObject:
    """The job's cost as the API shows it: stored actuals once final, the usage so far before."""
    row = row or cost_rows.get_job_cost(session, job_id=job.id)
    estimate = (row.estimate if row is not None else None) or {}
    final = row is not None and row.finalized_at is not None
    if final:
        hours, cost = row.actual_gpu_hours or 0.0, row.actual_cost_usd or 0.0
    else:
        seconds, cost = cost_rows.job_usage(session, job_id=job.id)
        hours = seconds / 3600
    return CostObject(
        device=estimate.get("device"), market=estimate.get("market"),
        price_per_gpu_hour=estimate.get("price_per_gpu_hour"), estimated_gpu_hours=_round(estimate.get("gpu_hours")),
        estimated_wall_seconds=_round(estimate.get("wall_seconds"), 1), estimated_cost_usd=_round(estimate.get("cost_usd")),
        estimate_basis=estimate.get("basis"), gpu_hours=_round(hours), cost_usd=_round(cost), final=final,
        overhead_fraction=_round(row.overhead_fraction, 4) if final else None,
        estimate_error=_round(row.estimate_error, 4) if final else None,
    )


def estimated_finish(job: Job, cost: CostObject) -> int | None:
    """When an unfinished job should be done: its start (or, queued, its creation) plus the estimated wall time."""
    if job.status in TERMINAL_STATUSES or cost.estimated_wall_seconds is None:
        return None
    return int((job.started_at or job.created_at) + cost.estimated_wall_seconds)


def _round(value: float | None, digits: int = 6) -> float | None:
    return round(value, digits) if value is not None else None
