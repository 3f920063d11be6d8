"""Continued pre-training (experimental): next-token loss on every token of raw text.

    python -m tuneforge.recipes.experimental.pretrain --job-dir DIR

For `text` data ({"text": ...} records): the documents are tokenized and concatenated, the stream is
cut into blocks of dataset.max_seq_length, and the model learns to predict every token. The job
directory, resume, preemption, the out-of-memory back-off and the summary are the runtime's, as for sft.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tuneforge.data.batching import Batcher
from tuneforge.data.cache import load_tokenized
from tuneforge.data.loading import file_sha256, iter_examples, split_indices
from tuneforge.data.templating import PromptRenderer, TokenizedExample
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts, trainable_model
from tuneforge.engine.base_models import resolve_base_model
from tuneforge.engine.loss import CausalLMLoss
from tuneforge.engine.model_loading import load_base_model, load_tokenizer
from tuneforge.evaluation.perplexity import evaluate_loss
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, JobSummary
from tuneforge.spec.loader import SpecError


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    return runtime.run_recipe(job_dir, pretrain, progress=progress)


def pretrain(job: runtime.RecipeJob) -> JobSummary:
    # Setup: blocks of text, the model, the resolved plan, the strategy's model and optimizer.
    model_dir, tokenizer, train_blocks, val_blocks = text_blocks(job)
    model = trainable_model(load_base_model(model_dir, job.spec.model, job.precision,
                                            full_finetune=job.spec.adapter.type == "full"), job.spec).train()
    trainable, _ = parameter_counts(model)  # before sharding: then each rank holds a part
    loss, batcher = CausalLMLoss(model), Batcher(train_blocks, tokenizer.pad_token_id)  # blocks are full rows
    spec = job.resolve_training(job.spec, examples=len(train_blocks), loss_module=loss, batcher=batcher,
                                model_dir=model_dir)
    schedule = job.schedule(len(batcher))
    prepared = job.prepare(loss, model, total_steps=schedule.total_steps)
    position = {"dataset_sha256": file_sha256(spec.dataset.path), "blocks": len(train_blocks),
                "examples_per_step": spec.training.batch_size, "seed": spec.training.seed}

    def validate() -> dict[str, float]:
        scores = evaluate_loss(prepared.eval_module(), val_blocks, batch_size=8, pad_id=tokenizer.pad_token_id,
                               precision=job.precision, parallel=job.parallel)
        return {k: scores[k] for k in ("loss", "perplexity", "token_accuracy") if k in scores}

    # Train, save, evaluate.
    training = runtime.train(job, prepared, batcher, schedule, micro=spec.training.per_device_batch_size,
                             resume=job.resume_point(), data_position=position, validate=validate if val_blocks else None)
    output = job.publish(model, tokenizer, prepared, full=spec.adapter.type == "full")
    final = EvalMetrics(**validate()) if val_blocks else EvalMetrics()
    return job.finish(training, prepared, evaluation=Evaluation(fine_tuned=final), output=output,
                      trainable_parameters=trainable, method="continued_pretraining")


def text_blocks(job: runtime.RecipeJob):
    """(model dir, tokenizer, training blocks, validation blocks): every document's tokens, end to end,
    cut into blocks of dataset.max_seq_length, a seeded share of them held out for validation."""
    data = job.spec.dataset
    with job.parallel.main_first():
        model_dir = resolve_base_model(job.spec.model.base_model)
        tokenizer = load_tokenizer(model_dir)
        if iter_examples(data.path, data.format)[0] != "text":
            raise SpecError("continued pre-training needs text data: records like {\"text\": \"...\"}")
        documents = load_tokenized(data.path, "text", PromptRenderer(tokenizer, "plain"))
    stream = np.concatenate([documents[i].input_ids for i in range(len(documents))])
    cut = range(0, len(stream) - 1, data.max_seq_length)
    blocks = [TokenizedExample(stream[i : i + data.max_seq_length], stream[i : i + data.max_seq_length], n)
              for n, i in enumerate(cut)]
    train_ids, val_ids = split_indices(len(blocks), data.train_split, job.spec.training.seed)
    return model_dir, tokenizer, [blocks[i] for i in train_ids], [blocks[i] for i in val_ids]


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.experimental.pretrain", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
