"""An export job (the Exports API's, api/routers/exports.py): export a registered model as deploy: says.

    python -m tuneforge.recipes.export_run --job-dir DIR

No training: the worker swapped export_run.model for the model's files (an adapter or a whole fine-tuned
model) and model.base_model for its base -> export.export_model runs every check `tuneforge export` runs
(server rules, merge equality, GGUF read back) -> DIR/export holds the files and serve.json -> the summary
says where. A refused export (a rule the adapter breaks, with no fallback) fails the job with the rule.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tuneforge.engine import runtime
from tuneforge.engine.runtime import RecipeJob
from tuneforge.spec.jobdir import EXPORT_DIR, Deployment, EvalMetrics, Evaluation, JobSummary, write_summary
from tuneforge.spec.loader import SpecError


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    return runtime.run_recipe(job_dir, export_run, progress=progress)


def export_run(job: RecipeJob) -> JobSummary:
    """source -> export_model (checks, build, verify) -> summary."""
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.export import ExportError, export_model
    from tuneforge.export.source import ExportSource

    spec, deploy = job.spec, job.spec.deploy
    if job.parallel.enabled:
        raise SpecError("an export runs in one process (resources.num_gpus 1)")
    model_dir = Path(spec.export_run.model)
    kind = "adapter" if (model_dir / "adapter_config.json").is_file() else "model"
    # model.base_model is the adapter's base as the worker materialized it (an adapter trained on another
    # adapter arrives merged into DIR/base-merged by the runtime): the base the merge checks run against.
    base_dir = resolve_base_model(spec.model.base_model) if kind == "adapter" else None
    source = ExportSource(kind, model_dir, base_dir, spec.name or "model", spec.model.quantization)
    fmt = deploy.export_format(spec.adapter)
    job.note(f"exporting the {kind} as {fmt} for {deploy.target}", kind="deploy", status="running",
             target=deploy.target, format=fmt)
    try:
        result = export_model(source, format=fmt, target=deploy.target, out=job.job_dir / EXPORT_DIR,
                              fallback=deploy.fallback if fmt == "adapter" else "none", gguf_type=deploy.gguf_type,
                              gpu=deploy.gpu_type, overwrite=True)  # overwrite: a retried attempt's leftovers
    except ExportError as exc:  # the export's own refusal: bad input, not retried
        raise SpecError(f"the {fmt} export for {deploy.target} was refused: {exc}") from None
    command = result.descriptor["commands"].get(deploy.target) or next(iter(result.descriptor["commands"].values()))
    deployment = Deployment(status="succeeded", target=deploy.target, format=result.format, path=EXPORT_DIR,
                            command=command, fallback_from=result.descriptor.get("fallback_from"))
    summary = JobSummary(
        method="export", adapter=spec.adapter.type, base_model=spec.model.base_model, device=str(job.device),
        precision=job.precision.name, steps=0, epochs=0.0, train_loss=None, train_loss_last_10_mean=None,
        tokens_seen=0, trained_tokens=0, trainable_parameters=0, eval=Evaluation(fine_tuned=EvalMetrics()),
        output="none", train_seconds=0.0, wall_time_s=round(time.time() - job.started, 2), world_size=1,
        strategy=job.strategy, ranks=[], deployment=deployment,
    )
    write_summary(job.job_dir, summary)
    job.events.emit("job succeeded", kind="status", status="succeeded", summary=summary.scalars())
    return summary


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.export_run", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
