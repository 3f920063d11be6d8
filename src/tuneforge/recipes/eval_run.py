"""An eval run (OpenAI's Evals shape): answer every item with the model, grade each answer, count the passes.

    python -m tuneforge.recipes.eval_run --job-dir DIR

No training loop: load the items (dataset.path) and check them against the eval's item schema -> load the
model (a base model, or a base with a fine-tuned adapter, or a fully fine-tuned model) -> render each
item's input messages with the chat template and generate greedily in batches -> grade with the eval's
testing criteria -> write DIR/output_items.jsonl and the counts into the summary. A `jsonl` run (no
eval_run.model) grades the samples its items carry, without loading a model. The runtime owns the rest:
spec.json in, events, stop requests, exit codes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.eval_items import EvalRow, load_eval_rows
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.engine import runtime
from tuneforge.engine.preemption import Preempted
from tuneforge.engine.runtime import RecipeJob
from tuneforge.spec.evals import (
    CriterionResult,
    EvalRunResult,
    ModelUsage,
    OutputItemRecord,
    ResultCounts,
    TemplateDataError,
    item_problems,
    referenced_messages,
    render_item_template,
    write_output_items,
)
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, JobSummary, write_summary
from tuneforge.spec.loader import SpecError

ITEMS = "the run's items"  # how problems name the data file (never a server path)


@dataclass
class Answers:
    """What the model said for each item (None: the item was not asked, `errors` says why)."""

    samples: list[dict[str, Any] | None]
    errors: dict[int, str] = field(default_factory=dict)
    usage: ModelUsage | None = None


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    return runtime.run_recipe(job_dir, eval_run, progress=progress)


def eval_run(job: RecipeJob) -> JobSummary:
    """items -> answers (generated, or the items' own) -> grades -> output items and counts."""
    if job.parallel.enabled:
        raise SpecError("an eval run runs in one process (resources.num_gpus 1)")
    rows = load_items(job)
    graders = build_graders(job)
    answers = answer(job, rows) if job.spec.eval_run.generates() else given_samples(rows)
    records, result = grade(job, rows, answers, graders)
    return finish(job, records, result)


# ---- items and graders ---------------------------------------------------------------------------


def load_items(job: RecipeJob) -> list[EvalRow]:
    """The items, each checked against the eval's item schema; every mismatch named by item and field."""
    rows = load_eval_rows(job.spec.dataset.path, display_name=ITEMS)
    schema = job.spec.eval_run.item_schema
    problems = []
    for index, row in enumerate(rows):
        for problem in item_problems(schema, row.item) if schema is not None else []:
            field, _, message = problem.partition(": ")
            problems.append(DataProblem(ITEMS, row.line, "item_schema", f"item {index} {field}",
                                        "an item that matches the eval's item_schema", message))
    if problems:
        raise DataError(problems, headline=f"{len(problems)} item(s) of the run do not match the eval's item_schema")
    job.note(f"{len(rows)} items ready", kind="dataset", items=len(rows),
             items_with_sample=sum(row.sample is not None for row in rows))
    return rows


def build_graders(job: RecipeJob) -> list:
    """A runner per testing criterion, checked before any answer is generated."""
    from tuneforge.evaluation.graders import GraderError, build_grader

    try:
        return [build_grader(spec) for spec in job.spec.eval_run.testing_criteria]
    except GraderError as exc:
        raise SpecError(str(exc)) from None


# ---- answers -------------------------------------------------------------------------------------


def given_samples(rows: list[EvalRow]) -> Answers:
    """A jsonl run: the samples the items carry."""
    missing = [index for index, row in enumerate(rows) if row.sample is None]
    if missing:
        raise DataError([DataProblem(ITEMS, rows[i].line, "missing_field", f"item {i} sample",
                                     'a "sample" beside the "item" (a jsonl run grades the samples it is given; '
                                     "use a completions data source to generate them)", "no sample") for i in missing])
    return Answers(samples=[dict(row.sample) for row in rows])


def conversation(job: RecipeJob, row: EvalRow, index: int) -> list[dict[str, str]]:
    """The item's input messages: the template rendered, or the conversation the item holds."""
    spec = job.spec.eval_run
    if spec.input_reference is not None:
        messages = referenced_messages(row.item, spec.input_reference, index)
    else:
        messages = [{"role": m.role, "content": render_item_template(m.content, row.item, index)}
                    for m in spec.input_messages]
    # OpenAI's developer role is its system role; local chat templates know only system.
    return [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]


def answer(job: RecipeJob, rows: list[EvalRow]) -> Answers:
    """Greedy answers of the model to every item's prompt, in batches; between batches a stop request
    (cancel, shutdown) ends the run."""
    from tuneforge.evaluation.generation import generate_batched

    spec = job.spec.eval_run
    try:
        conversations = [conversation(job, row, index) for index, row in enumerate(rows)]
    except TemplateDataError as exc:
        raise DataError([DataProblem(ITEMS, 0, "missing_field", "input_messages", "every field the input messages "
                                     "name, in every item", str(exc))], headline=str(exc)) from None
    model, tokenizer = load_model(job)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    context = getattr(model.config, "max_position_embeddings", None)
    answers = Answers(samples=[None] * len(rows))
    for index, length in enumerate(lengths):
        if context is not None and length + spec.max_completion_tokens > context:
            answers.errors[index] = (f"the prompt is {length} tokens; with max_completion_tokens "
                                     f"{spec.max_completion_tokens} it exceeds the model's context of {context}")
    todo = [i for i in range(len(rows)) if i not in answers.errors]
    new_tokens, started = 0, time.monotonic()
    for start in range(0, len(todo), spec.generation_batch_size):
        if job.watcher.requested:
            job.note(f"stopped ({job.watcher.reason}) after {start} of {len(todo)} items", level="warning",
                     kind="status", status="preempted", reason=job.watcher.reason)
            raise Preempted(start, job.watcher.reason)
        batch = todo[start : start + spec.generation_batch_size]
        with job.precision.autocast():
            generated = generate_batched(model, tokenizer, [prompts[i] for i in batch],
                                         max_new_tokens=spec.max_completion_tokens,
                                         batch_size=spec.generation_batch_size, add_special_tokens=False,
                                         device=job.precision.device)
        new_tokens += generated.new_tokens
        for index, text in zip(batch, generated.texts):
            answers.samples[index] = sample_of(job, conversations[index], text, lengths[index], tokenizer)
        done = start + len(batch)
        job.note(f"answered {done} of {len(todo)} items", kind="progress", items_done=done, items=len(todo),
                 new_tokens=new_tokens, tokens_per_second=round(new_tokens / max(time.monotonic() - started, 1e-9), 1))
    asked = len(todo)
    prompt_tokens = sum(lengths[i] for i in todo)
    answers.usage = ModelUsage(model_name=spec_model_name(job), invocation_count=asked, prompt_tokens=prompt_tokens,
                               completion_tokens=new_tokens, total_tokens=prompt_tokens + new_tokens)
    return answers


def sample_of(job: RecipeJob, messages: list[dict], text: str, prompt_tokens: int, tokenizer) -> dict[str, Any]:
    """OpenAI's sample shape. completion_tokens re-counts the decoded answer (the stop token included when it
    stopped); finish_reason is length when the answer used the whole budget."""
    spec = job.spec.eval_run
    completion = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    finish = "length" if completion >= spec.max_completion_tokens else "stop"
    completion = min(completion + (finish == "stop"), spec.max_completion_tokens)
    return {
        "input": messages, "output": [{"role": "assistant", "content": text}], "output_text": text,
        "finish_reason": finish, "model": spec_model_name(job), "max_completion_tokens": spec.max_completion_tokens,
        "seed": spec.seed, "temperature": 0.0, "top_p": 1.0, "error": None,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion, "cached_tokens": 0},
    }


def spec_model_name(job: RecipeJob) -> str:
    """How outputs name the model: a built-in name, or a registered model's last two path parts (the worker
    swapped its id for a local path; the API shows the id itself)."""
    from tuneforge.spec.job import BUILTIN_BASE_MODELS

    model = job.spec.eval_run.model or ""
    if model in BUILTIN_BASE_MODELS or not model:
        return model
    path = Path(model)
    return f"{path.parent.name}/{path.name}"


def load_model(job: RecipeJob):
    """The model under evaluation, in eval mode: a base model, a base with an adapter, or a full model."""
    from tuneforge.engine.base_models import needs_import, resolve_base_model
    from tuneforge.engine.model_loading import load_base_model, load_tokenizer
    from tuneforge.data.templating import CHATML_TEMPLATE
    from tuneforge.evaluation.standalone import EvalInputError, resolve_target

    try:
        target = resolve_target(job.spec.eval_run.model)
    except EvalInputError as exc:
        raise SpecError(str(exc).replace("--model ", "eval_run.model ")) from None
    if needs_import(target.base_model):
        job.note(f"importing {target.base_model} into the model cache (first use only)", kind="model_import")
    base_dir = resolve_base_model(target.base_model)
    model = load_base_model(target.model_dir or base_dir, job.spec.model, job.precision, full_finetune=False)
    tokenizer_dir = target.adapter_dir or target.model_dir or base_dir
    tokenizer = load_tokenizer(tokenizer_dir if (tokenizer_dir / "tokenizer_config.json").is_file() else base_dir)
    if target.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.adapter_dir)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.eval()
    job.phase("model_load_s")
    job.note(f"loaded {spec_model_name(job)} ({target.kind})", kind="model", model=spec_model_name(job),
             target=target.kind)
    return model, tokenizer


# ---- grading -------------------------------------------------------------------------------------


def grade(job: RecipeJob, rows: list[EvalRow], answers: Answers,
          graders: list) -> tuple[list[OutputItemRecord], EvalRunResult]:
    """Every criterion on every answered item; an item passes when all pass, errs when one cannot grade it."""
    from tuneforge.evaluation.graders import GraderError

    asked = [i for i, sample in enumerate(answers.samples) if sample is not None]
    items = [rows[i].item for i in asked]
    samples = [answers.samples[i] for i in asked]
    criteria = job.spec.eval_run.testing_criteria
    graded: dict[str, list] = {}
    for spec, runner in zip(criteria, graders):
        try:
            results = runner.grade(items, samples)
        except GraderError as exc:  # the data does not fit the grader (a field its templates name is missing)
            raise DataError([DataProblem(ITEMS, 0, "grader", spec.name, "items with every field the graders name",
                                         str(exc))], headline=str(exc)) from None
        graded[spec.name] = dict(zip(asked, results))
    records, counts = [], ResultCounts(total=len(rows))
    per = {spec.name: CriterionResult(testing_criteria=spec.name) for spec in criteria}
    for index, row in enumerate(rows):
        sample = answers.samples[index]
        if sample is None:
            sample = {"input": [], "output": [], "finish_reason": None, "model": spec_model_name(job),
                      "error": {"code": "sample_error", "message": answers.errors[index]}}
            records.append(OutputItemRecord(index=index, status="error", item=row.item, sample=sample, results=[]))
            counts.errored += 1
            continue
        results, outcomes = [], []
        for spec in criteria:
            result = graded[spec.name][index]
            outcome = None if result.score is None else bool(result.passed)
            outcomes.append(outcome)
            if outcome is not None:
                per[spec.name].passed += outcome
                per[spec.name].failed += not outcome
            entry = {"name": spec.name, "type": spec.type, "score": result.score, "passed": bool(outcome)}
            extra = {k: v for k, v in (("error", result.error), ("sub_scores", result.sub_scores or None),
                                       ("judge_output", result.judge_output), ("label", result.label)) if v is not None}
            results.append({**entry, **({"sample": extra} if extra else {})})
        status = "error" if None in outcomes else "pass" if all(outcomes) else "fail"
        counts.errored += status == "error"
        counts.passed += status == "pass"
        counts.failed += status == "fail"
        records.append(OutputItemRecord(index=index, status=status, item=row.item, sample=sample, results=results))
    result = EvalRunResult(result_counts=counts, per_testing_criteria_results=list(per.values()),
                           per_model_usage=[answers.usage] if answers.usage else [])
    job.note(f"graded {len(rows)} items: {counts.passed} passed, {counts.failed} failed, {counts.errored} errored",
             kind="eval", **counts.model_dump())
    return records, result


def finish(job: RecipeJob, records: list[OutputItemRecord], result: EvalRunResult) -> JobSummary:
    """The output items, then the summary (written last: its presence means success)."""
    write_output_items(job.job_dir, records)
    means = {}
    for position, spec in enumerate(job.spec.eval_run.testing_criteria):
        scores = [r.results[position]["score"] for r in records
                  if r.results and r.results[position]["score"] is not None]
        if scores:
            means[spec.name] = sum(scores) / len(scores)
    usage = result.per_model_usage[0] if result.per_model_usage else None
    summary = JobSummary(
        method="eval", adapter=job.spec.adapter.type,
        base_model=job.spec.model.base_model if job.spec.eval_run.generates() else "none", device=str(job.device),
        precision=job.precision.name, steps=0, epochs=0.0, train_loss=None, train_loss_last_10_mean=None,
        tokens_seen=usage.total_tokens if usage else 0, trained_tokens=0, trainable_parameters=0,
        eval=Evaluation(fine_tuned=EvalMetrics(graders=means)), output="none", train_seconds=0.0,
        wall_time_s=round(time.time() - job.started, 2), world_size=1, strategy=job.strategy, ranks=[],
        eval_run=result,
    )
    write_summary(job.job_dir, summary)
    job.events.emit("job succeeded", kind="status", status="succeeded", summary=summary.scalars())
    return summary


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.eval_run", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
