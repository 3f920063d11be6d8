"""`tuneforge eval`: evaluate any model tuneforge can load on a data file, against its base when asked.

A model is a built-in name or a local Hugging Face directory (a base model), a PEFT adapter directory,
a job directory (its output: the adapter or the fully fine-tuned model), or one of a job's checkpoints.
An adapter's base pass reuses the loaded model with the adapter switched off (`disable_adapter`); a
fully fine-tuned model's base is loaded beside it. Optionally EleutherAI's lm-evaluation-harness runs
local task files on the same loaded model.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.spec.job import BUILTIN_BASE_MODELS, EvaluationSpec, JobSpec, ModelSpec
from tuneforge.spec.jobdir import EvaluationReport

EVAL_BATCH = 8


class EvalInputError(ValueError):
    """A model reference, data file or option `tuneforge eval` cannot use; the message says why."""


@dataclass
class Target:
    """What `--model` named, resolved to what is loaded."""

    kind: Literal["base", "adapter", "model", "checkpoint"]
    label: str  # how the report names it
    base_model: str  # a built-in name or a model directory: the base of a fine-tuned model
    adapter_dir: Path | None = None  # kind adapter: a PEFT adapter on base_model
    model_dir: Path | None = None  # kind model: a fully fine-tuned model, loaded instead of the base
    checkpoint: Path | None = None  # kind checkpoint: the trained weights of one step
    job_spec: JobSpec | None = None  # the job it came from (its model loading and prompt template)
    prompt_template: str = "auto"

    @property
    def has_base(self) -> bool:
        return self.kind != "base"


def resolve_target(reference: str) -> Target:
    """Tell a built-in model, a model directory, an adapter, a job directory and a checkpoint apart."""
    from tuneforge.engine.checkpoint import TRAINER_STATE, verify_checkpoint
    from tuneforge.spec.jobdir import SPEC_FILE, read_spec, read_summary

    if reference in BUILTIN_BASE_MODELS:
        return Target("base", reference, reference)
    path = Path(reference).expanduser().resolve()
    if not path.is_dir():
        raise EvalInputError(f"--model {reference}: expected a built-in model ({', '.join(BUILTIN_BASE_MODELS)}), a model "
                             "or adapter directory, a job directory or a checkpoint directory; no such directory")
    if (path / SPEC_FILE).is_file():
        spec, summary = read_spec(path), read_summary(path)
        if summary is None:
            raise EvalInputError(f"--model {path}: the job has no output yet (it has not succeeded); evaluate one of "
                                 f"its checkpoints instead ({path / 'checkpoints'}/step-N)")
        output = path / summary.output
        kind = "adapter" if summary.output == "adapter" else "model"
        return Target(kind, f"{path.name} ({summary.output}/)", spec.model.base_model,
                      adapter_dir=output if kind == "adapter" else None, model_dir=output if kind == "model" else None,
                      job_spec=spec, prompt_template=_resolved_template(path, spec))
    if (path / TRAINER_STATE).is_file():
        job_dir = path.parent.parent
        if not (job_dir / SPEC_FILE).is_file():
            raise EvalInputError(f"--model {path}: a checkpoint outside its job directory (no {job_dir / SPEC_FILE}); "
                                 "the job's spec says how to load it")
        problem = verify_checkpoint(path)
        if problem:
            raise EvalInputError(f"--model {path}: the checkpoint cannot be used: {problem}")
        if (path / "sharded").is_dir() or (path / "deepspeed").is_dir():
            raise EvalInputError(f"--model {path}: a sharded checkpoint (FSDP or DeepSpeed) loads only into the job's "
                                 "processes; evaluate the job's output, or resume the job to its end")
        spec = read_spec(job_dir)
        return Target("checkpoint", f"{job_dir.name} {path.name}", spec.model.base_model, checkpoint=path,
                      job_spec=spec, prompt_template=_resolved_template(job_dir, spec))
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
        if not base or (base not in BUILTIN_BASE_MODELS and not (Path(base) / "config.json").is_file()):
            raise EvalInputError(f"--model {path}: the adapter's base model {base!r} is not a built-in model or a local "
                                 "model directory")
        return Target("adapter", path.name, base, adapter_dir=path)
    if (path / "config.json").is_file():
        return Target("base", path.name, str(path))
    raise EvalInputError(f"--model {path}: not a model (no config.json), adapter (no adapter_config.json), job "
                         "(no spec.json) or checkpoint directory (no trainer_state.json)")


def _resolved_template(job_dir: Path, spec: JobSpec) -> str:
    from tuneforge.spec.jobdir import read_resolved_spec

    resolved = read_resolved_spec(job_dir) or {}
    return (resolved.get("dataset") or {}).get("prompt_template") or spec.dataset.prompt_template


@dataclass
class Loaded:
    model: object  # what answers: the base, the base with the adapter, or the fine-tuned model
    tokenizer: object
    precision: object
    base_dir: Path
    peft: bool


def load_target(target: Target) -> Loaded:
    """The model (and its adapter or checkpoint weights) on the best device, in inference precision."""
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.model_loading import load_base_model, load_tokenizer
    from tuneforge.engine.precision import resolve_device, resolve_precision

    device = resolve_device()
    precision = resolve_precision("auto", device)
    model_spec = target.job_spec.model if target.job_spec else ModelSpec(base_model=target.base_model)
    base_dir = resolve_base_model(target.base_model)
    model = load_base_model(target.model_dir or base_dir, model_spec, precision, full_finetune=False)
    tokenizer_dir = target.adapter_dir or target.model_dir or base_dir
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer_dir = base_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    peft = False
    if target.adapter_dir is not None:
        from peft import PeftModel

        model, peft = PeftModel.from_pretrained(model, target.adapter_dir), True
    elif target.checkpoint is not None:
        from tuneforge.engine.adapters import trainable_model
        from tuneforge.engine.weights import load_trainable

        model = trainable_model(model, target.job_spec)
        load_trainable(model, target.checkpoint)
        peft = target.job_spec.adapter.type != "full"
    model.eval()
    return Loaded(model, tokenizer, precision, base_dir, peft)


def evaluate_model(target: Target, data_path: Path, spec: EvaluationSpec, *, base: bool = False,
                   max_seq_length: int | None = None, note=lambda message: None) -> EvaluationReport:
    """The report of target (and with base=True, of its base model) on the data file."""
    from tuneforge.data.loading import load_examples
    from tuneforge.data.problems import DataError
    from tuneforge.data.templating import PromptRenderer, fit_to_length, resolve_template
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.evaluation.report import build_report
    from tuneforge.evaluation.runner import evaluate

    if base and not target.has_base:
        raise EvalInputError(f"--base compares a fine-tuned model with its base; {target.label} is a base model")
    loaded = load_target(target)
    try:
        examples, data_format = load_examples(data_path)
    except DataError as exc:
        raise EvalInputError(str(exc).replace("nothing was trained", "nothing was evaluated")) from None
    examples = examples[: spec.max_eval_examples or None]
    renderer = PromptRenderer(loaded.tokenizer, resolve_template(target.prompt_template, data_format, loaded.tokenizer))
    length = max_seq_length or (target.job_spec.dataset.max_seq_length if target.job_spec else 2048)
    tokenized, _ = fit_to_length(renderer.tokenize_many(examples), max_seq_length=length, too_long="truncate")

    def run(model) -> dict:
        return evaluate(model, CausalLMLoss(model), loaded.tokenizer, renderer, examples, tokenized, spec,
                        batch_size=EVAL_BATCH, precision=loaded.precision, details=True)

    note(f"evaluating {target.label} on {len(examples)} examples of {data_path}")
    scored = run(loaded.model)
    base_result = None
    if base:
        note(f"evaluating its base model {target.base_model}")
        if loaded.peft:
            with loaded.model.disable_adapter():  # the same loaded weights, the adapter switched off
                base_result = run(loaded.model)
        else:
            base_target = Target("base", target.base_model, target.base_model, job_spec=target.job_spec,
                                 prompt_template=target.prompt_template)
            base_loaded = load_target(base_target)
            base_result = run(base_loaded.model)
            del base_loaded
    alone = target.kind == "base"
    return build_report(spec, base=scored if alone else base_result, fine_tuned=None if alone else scored,
                        dataset=str(data_path), examples=len(examples), base_model=target.base_model,
                        fine_tuned_model=None if alone else target.label)


# ---- lm-evaluation-harness --------------------------------------------------------------------------


LM_EVAL_MISSING = ("--lm-eval-tasks needs EleutherAI's lm-evaluation-harness, which is not installed: "
                   "pip install lm-eval (tuneforge runs it on local task files only, never downloading tasks or data)")


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def task_names(task_files: list[Path]) -> list[str]:
    """The task names that local lm-evaluation-harness task files (YAML, `task: NAME`) define."""
    import yaml

    names = []
    for file in task_files:
        if not file.is_file() or file.suffix not in (".yaml", ".yml"):
            raise EvalInputError(f"--lm-eval-tasks {file}: expected a local task file (.yaml)")
        try:
            document = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise EvalInputError(f"--lm-eval-tasks {file}: malformed YAML ({exc})") from None
        if not isinstance(document, dict) or not isinstance(document.get("task"), str):
            raise EvalInputError(f"--lm-eval-tasks {file}: a task file names its task (task: NAME)")
        names.append(document["task"])
    return names


def run_lm_eval(target: Target, task_files: list[Path], *, limit: int | None = None, batch_size: int = EVAL_BATCH,
                adapter: bool = True) -> dict:
    """lm-evaluation-harness's results for the local task files, on the model loaded as tuneforge loads it.
    Hugging Face hub access is switched off first, so a task that names a hub dataset fails instead of
    downloading it."""
    if not lm_eval_available():
        raise EvalInputError(LM_EVAL_MISSING)
    names = task_names(task_files)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    loaded = load_target(target)
    manager = TaskManager(include_path=sorted({str(f.parent.resolve()) for f in task_files}), include_defaults=False)
    context = loaded.model.disable_adapter() if loaded.peft and not adapter else nullcontext()
    with context:
        results = simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size),
                                  tasks=names, task_manager=manager, limit=limit)
    return results.get("results", {})


def format_lm_eval(results: dict) -> str:
    lines = ["lm-evaluation-harness:"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
                stderr = metrics.get(name.replace(",", "_stderr,", 1))
                spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
                lines.append(f"  {task}  {name}  {value:.4f}{spread}")
    return "\n".join(lines)
