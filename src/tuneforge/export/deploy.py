"""`deploy:` in a job spec: the export a succeeded job runs on its own output, into DIR/export.

The recipe runtime calls `run_deploy` once, on rank 0, after the output is published and before the summary is
written, so the summary and the events say where the export went. A failed export does not fail the job (the
trained output is intact and `tuneforge export JOB_DIR` can run again): it is an error event and a `failed`
deployment in the summary, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuneforge.spec.job import JobSpec
from tuneforge.spec.jobdir import EXPORT_DIR, Deployment


def run_deploy(job_dir: Path, spec: JobSpec, output: str, note: Callable[..., None]) -> Deployment | None:
    """Export DIR/output as spec.deploy asks; None when deploy.target is none."""
    deploy = spec.deploy
    if deploy.target == "none":
        return None
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.export import export_model
    from tuneforge.export.source import ExportSource

    fmt = deploy.export_format(spec.adapter)
    kind = "adapter" if spec.adapter.type != "full" else "model"
    source = ExportSource(kind, job_dir / output, resolve_base_model(spec.model.base_model) if kind == "adapter" else None,
                          spec.name or job_dir.name, spec.model.quantization)
    note(f"deploy: exporting the {output} as {fmt} for {deploy.target}", kind="deploy", status="running",
         target=deploy.target, format=fmt)
    try:
        result = export_model(source, format=fmt, target=deploy.target, out=job_dir / EXPORT_DIR,
                              fallback=deploy.fallback if fmt == "adapter" else "none",
                              gguf_type=deploy.gguf_type, gpu=deploy.gpu_type, overwrite=True)
    except Exception as exc:  # the job's output stays; the reason goes to the events and the summary
        reason = f"{type(exc).__name__}: {exc}"
        note(f"deploy: the {fmt} export for {deploy.target} failed: {reason}", level="error", kind="deploy",
             status="failed", target=deploy.target, format=fmt, error=reason)
        return Deployment(status="failed", target=deploy.target, format=fmt, error=reason)
    command = result.descriptor["commands"].get(deploy.target) or next(iter(result.descriptor["commands"].values()))
    note(f"deploy: {result.format} export for {deploy.target} in {EXPORT_DIR}/; serve it with: {command}",
         kind="deploy", status="succeeded", target=deploy.target, format=result.format, path=EXPORT_DIR,
         command=command, fallback_from=result.descriptor.get("fallback_from"))
    return Deployment(status="succeeded", target=deploy.target, format=result.format, path=EXPORT_DIR, command=command,
                      fallback_from=result.descriptor.get("fallback_from"))
