"""Run the metrics and graders an evaluation spec asks for on a validation set, for one model.

Likelihood metrics (loss, perplexity, token accuracy) share one teacher-forced pass; generated metrics
and graders share one greedy generation pass (evaluation/generation.py). Under several processes every
rank calls this: each scores and generates a share, and every rank gets the same results.

The result is a JSON-ready dict: each metric's and grader's value under its name (what events and the
summary carry), `samples` (the first few generations), and with details=True a `details` entry holding
what the report's intervals need (per-example values, every prediction).
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.formats import Example
from tuneforge.data.templating import PromptRenderer, TokenizedExample
from tuneforge.engine.distributed import Distributed, gathered
from tuneforge.evaluation.generation import generate_batched
from tuneforge.evaluation.perplexity import evaluate_loss
from tuneforge.spec.job import LIKELIHOOD_METRICS, EvaluationSpec
from tuneforge.spec.jobdir import EvalMetrics
from tuneforge.spec.loader import SpecError

SUMMARY_SAMPLES = 3  # generations kept in the summary (the report keeps evaluation.report_samples)


def evaluate(
    model,
    loss_module,
    tokenizer,
    renderer: PromptRenderer,
    examples: list[Example],
    tokenized: list[TokenizedExample],
    spec: EvaluationSpec,
    *,
    batch_size: int,
    precision,
    parallel: Distributed | None = None,
    details: bool = False,
    judges: Any = None,
) -> dict:
    """Metrics and graders named in spec on the validation set (tokenized for likelihood metrics, the
    records for generated ones). judges: what the graders' score_model / label_model call (see
    evaluation/graders.py build_grader); None lets the graders resolve their own."""
    parallel = parallel or Distributed()
    results: dict[str, Any] = {}
    more: dict[str, Any] = {}
    if set(LIKELIHOOD_METRICS) & set(spec.metrics) and tokenized:
        measured = evaluate_loss(loss_module, tokenized, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                 precision=precision, parallel=parallel, per_example=details)
        for name in spec.measured():
            if name in LIKELIHOOD_METRICS and name in measured:
                results[name] = measured[name]
        more["likelihood"] = {k: measured[k] for k in ("tokens", "examples", "per_example") if k in measured}
    if spec.needs_generation() and examples:
        prompts, references = (list(column) for column in zip(*(renderer.generation_prompt(e) for e in examples)))
        predictions, new_tokens = _generate(model, loss_module, tokenizer, renderer, prompts, spec, precision, parallel)
        scores = _score(spec, examples, predictions, references, parallel, judges)
        results.update({name: score["value"] for name, score in scores.items()})
        results["samples"] = [{"prompt": _shown_prompt(e, p), "reference": r, "prediction": o}
                              for e, p, r, o in list(zip(examples, prompts, references, predictions))[:SUMMARY_SAMPLES]]
        more.update(scores=scores, predictions=predictions, references=references, new_tokens=new_tokens,
                    prompts=[_shown_prompt(e, p) for e, p in zip(examples, prompts)])
    if details:
        results["details"] = more
    return results


def _generate(model, loss_module, tokenizer, renderer, prompts, spec, precision, parallel) -> tuple[list[str], int]:
    """Every rank answers a share of the prompts; the answers come back in the prompts' order."""
    world = parallel.world_size
    # Longest first before sharing out, so every rank gets a similar mix of lengths (and batches of
    # similar lengths: generate_batched sorts its share again).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    mine = order[parallel.rank :: world]
    share = -(-len(prompts) // world)  # equal shares on every rank, or a synced generate hangs
    padded = [prompts[i] for i in mine] + [prompts[order[0]]] * (share - len(mine))
    # A sharded model answers only inside gathered(): its root weights (embeddings, LM head) whole.
    with precision.autocast(), gathered(loss_module):
        generations = generate_batched(model, tokenizer, padded, max_new_tokens=spec.max_new_tokens,
                                       batch_size=spec.generation_batch_size,
                                       add_special_tokens=renderer.template != "chat", device=precision.device,
                                       synced=parallel.enabled)
    answers = generations.texts[: len(mine)]
    predictions: list[str | None] = [None] * len(prompts)
    for indices, texts in parallel.gather((mine, answers)):
        for index, text in zip(indices, texts):
            predictions[index] = text
    new_tokens = int(parallel.sum([float(generations.new_tokens)])[0])
    return predictions, new_tokens


def _score(spec: EvaluationSpec, examples: list[Example], predictions: list[str], references: list[str],
           parallel: Distributed, judges) -> dict[str, dict]:
    """{name: {"value", "n", "per_example", "corpus"}} for each generated metric and grader; graders run
    on rank 0 only (a judge model is costly) and every rank gets its results."""
    from tuneforge.evaluation.metrics import MetricError, score

    scores: dict[str, dict] = {}
    for name in spec.generated():
        try:
            result = score(name, predictions, references, options=spec.metric_options(name))
        except MetricError as exc:
            raise SpecError(f"evaluation.metrics: {exc}") from None
        scores[name] = {"value": result.value, "n": result.n, "per_example": list(result.per_example),
                        "corpus": result.corpus}
    if spec.graders:
        graded = _grade(spec, examples, predictions, references, judges) if parallel.is_main else None
        scores.update(parallel.broadcast(graded))
    return scores


def _grade(spec: EvaluationSpec, examples, predictions, references, judges) -> dict[str, dict]:
    """Each grader's mean score over the items it could grade (an answer a judge gave no score for, say,
    is counted in `errors`, not as a zero)."""
    from tuneforge.evaluation.graders import GraderError, build_grader

    items = [grader_item(e, r) for e, r in zip(examples, references)]
    samples = [{"output_text": p} for p in predictions]
    graded = {}
    for grader in spec.graders:
        try:
            results = build_grader(grader, judges=judges).grade(items, samples)
        except GraderError as exc:
            raise SpecError(f"evaluation.graders: {exc}") from None
        values = [float(r.score) for r in results if r.score is not None]
        graded[grader.name] = {"value": sum(values) / len(values) if values else None, "n": len(values),
                               "per_example": values, "errors": len(results) - len(values), "corpus": False}
    return graded


def grader_item(example: Example, reference: str) -> dict[str, Any]:
    """What a grader template's {{item.*}} sees: the record's own fields, plus `reference` (the answer the
    example teaches) unless the record has a field of that name."""
    return {"reference": reference, **example.record}


def _shown_prompt(example: Example, prompt: str) -> str:
    """The last user turn (what a reader wants to see), or the end of the rendered prompt."""
    try:
        messages = example.as_messages()
    except ValueError:
        return prompt[-300:]
    users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else prompt[-300:]


def eval_metrics(result: dict, spec: EvaluationSpec) -> EvalMetrics:
    """The summary's record of one model's scores: metrics by field, graders by name, a few samples."""
    graders = {g.name: result[g.name] for g in spec.graders if result.get(g.name) is not None}
    fields = {k: v for k, v in result.items() if k in EvalMetrics.model_fields and k not in ("graders", "details")}
    return EvalMetrics(**fields, graders=graders)
