"""What an export starts from: a job directory, a PEFT adapter directory, or a Hugging Face model directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.spec.jobdir import ADAPTER_DIR, MODEL_DIR, SPEC_FILE, read_resolved_spec, read_spec, read_summary


class ExportError(ValueError):
    """An export that cannot be made as asked; nothing was written."""


@dataclass(frozen=True)
class ExportSource:
    kind: str  # "adapter" (a PEFT adapter on base_dir) or "model" (a whole Hugging Face model)
    path: Path  # the adapter or model directory
    base_dir: Path | None  # adapter: the full-precision base model it applies to
    name: str  # the served model name
    trained_quantization: str = "none"  # the base's quantization during training (nf4 for QLoRA), if known


def resolve_source(path: Path, *, base: Path | None = None, name: str | None = None) -> ExportSource:
    """A job directory resolves to its published output (summary.output); an adapter directory to its
    adapter_config.json's base model (or `base`), a model directory to itself."""
    path = path.expanduser().resolve()
    if (path / SPEC_FILE).is_file():
        return _from_job(path, base=base, name=name)
    if (path / "adapter_config.json").is_file():
        return ExportSource("adapter", path, _adapter_base(path, base), name or path.name)
    if (path / "config.json").is_file():
        if base is not None:
            raise ExportError(f"{path} is a whole model, not an adapter: --base applies to adapters only")
        return ExportSource("model", path, None, name or path.name)
    raise ExportError(f"{path}: expected a job directory (with {SPEC_FILE}), a PEFT adapter directory "
                      "(with adapter_config.json) or a Hugging Face model directory (with config.json)")


def _from_job(job_dir: Path, *, base: Path | None, name: str | None) -> ExportSource:
    from tuneforge.engine.base_models import resolve_base_model

    summary = read_summary(job_dir)
    if summary is None:
        raise ExportError(f"{job_dir}: the job has not succeeded (no summary.json), so it has no output to export")
    spec = read_spec(job_dir)
    resolved = read_resolved_spec(job_dir) or {}
    quantization = (resolved.get("model") or {}).get("quantization", spec.model.quantization)
    served = name or spec.name or job_dir.name
    output = job_dir / summary.output
    if not any(output.glob("*.json")) and any(output.rglob("*.tfe")):  # registry/storage/job_files.py SEALED_SUFFIX
        raise ExportError(f"{job_dir}: its {summary.output} is sealed at rest (the server's encryption at rest); "
                          "serve the model through `tuneforge server` (/v1/chat/completions), or `tuneforge models "
                          "download` it and give that directory")
    if summary.output == MODEL_DIR:
        return ExportSource("model", job_dir / MODEL_DIR, None, served, quantization)
    adapter = job_dir / ADAPTER_DIR
    base_dir = base.expanduser().resolve() if base else resolve_base_model(spec.model.base_model)
    return ExportSource("adapter", adapter, base_dir, served, quantization)


def _adapter_base(adapter: Path, base: Path | None) -> Path:
    if base is not None:
        base = base.expanduser().resolve()
    else:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        recorded = config.get("base_model_name_or_path")
        if not recorded:
            raise ExportError(f"{adapter}/adapter_config.json names no base model; give it with --base DIR")
        base = Path(recorded).expanduser()
        if not base.is_absolute():
            raise ExportError(f"{adapter}: its base model is {recorded!r}, not a local directory; nothing is downloaded "
                              "from a hub: give the base model's directory with --base DIR")
    if not (base / "config.json").is_file():
        raise ExportError(f"{adapter}: its base model {base} is not a Hugging Face model directory (no config.json); "
                          "give it with --base DIR")
    return base
