"""Run the metrics a job spec asks for on its validation set, for the base model and the trained one."""

from __future__ import annotations

from tuneforge.data.formats import Example
from tuneforge.data.templating import PromptRenderer, TokenizedExample
from tuneforge.engine.distributed import Distributed, gathered
from tuneforge.evaluation.generation import exact_match, generate
from tuneforge.evaluation.perplexity import evaluate_loss
from tuneforge.spec.job import EvaluationSpec


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
) -> dict:
    """Metrics named in spec.metrics; loss-based ones share one pass over the data. Under several
    processes every rank must call this (each scores a share); every rank gets the same results."""
    parallel = parallel or Distributed()
    results: dict = {}
    if {"loss", "perplexity"} & set(spec.metrics) and tokenized:
        measured = evaluate_loss(loss_module, tokenized, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                 precision=precision, parallel=parallel)
        if "loss" in spec.metrics:
            results["loss"] = measured.get("loss")
            results["token_accuracy"] = measured.get("token_accuracy")
        if "perplexity" in spec.metrics:
            results["perplexity"] = measured.get("perplexity")
    if "exact_match" in spec.metrics and examples:
        prompts, references = zip(*(renderer.generation_prompt(e) for e in examples))
        mine = list(prompts)[parallel.rank :: parallel.world_size]
        share = -(-len(prompts) // parallel.world_size)  # equal batches on every rank, or generate hangs
        # A sharded model answers only inside gathered(): its root weights (embeddings, LM head) whole.
        with precision.autocast(), gathered(loss_module):
            answers = generate(
                model, tokenizer, mine + [prompts[0]] * (share - len(mine)), max_new_tokens=spec.max_new_tokens,
                add_special_tokens=renderer.template != "chat", device=precision.device,
                synced=parallel.enabled,
            )[: len(mine)]
        by_rank = parallel.gather(answers)
        predictions = [by_rank[i % parallel.world_size][i // parallel.world_size] for i in range(len(prompts))]
        results["exact_match"] = exact_match(predictions, list(references))
        results["samples"] = [
            {"prompt": p[-200:], "reference": r, "prediction": o} for p, r, o in list(zip(prompts, references, predictions))[:3]
        ]
    return results
