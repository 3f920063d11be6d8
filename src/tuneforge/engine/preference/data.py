"""A preference job's data: the tokenizer, the pairs tokenized with its chat template, split and fitted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.formats import Example
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, load_examples, split_indices
from tuneforge.data.preference import TokenizedPair, fit_pairs, tokenize_pairs
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.templating import PromptRenderer, resolve_template
from tuneforge.engine.model_loading import load_tokenizer


@dataclass
class PreferenceData:
    model_dir: Path
    tokenizer: Any
    renderer: PromptRenderer
    train: list[TokenizedPair]
    val: list[TokenizedPair]
    val_examples: list[Example]  # the validation records, for generated metrics (prompt -> the chosen reply)


def load_preference_data(job, *, max_prompt_length: int | None = None, need_labels: bool = True) -> PreferenceData:
    """Validated pairs (every problem of the file at once), tokenized, split (dataset.validation_path or
    dataset.train_split), fitted to dataset.max_seq_length; a `dataset` event says what was kept."""
    spec, data_cfg = job.spec, job.spec.dataset
    model_dir = job.base_model_dir()
    tokenizer = load_tokenizer(model_dir)
    renderer = PromptRenderer(tokenizer, resolve_template(data_cfg.prompt_template, "preference", tokenizer))
    examples, _ = load_examples(data_cfg.path, "preference")
    if data_cfg.validation_path:
        train_examples, val_examples = examples, load_examples(data_cfg.validation_path, "preference")[0]
    else:
        train_ids, val_ids = split_indices(len(examples), data_cfg.train_split, spec.training.seed)
        train_examples, val_examples = [examples[i] for i in train_ids], [examples[i] for i in val_ids]
    val_examples = val_examples[: spec.evaluation.max_eval_examples or None]
    train, stats = fit_pairs(tokenize_pairs(train_examples, renderer), max_seq_length=data_cfg.max_seq_length,
                             max_prompt_length=max_prompt_length, too_long=data_cfg.too_long, file=data_cfg.path,
                             need_labels=need_labels)
    if len(train) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(data_cfg.path, 0, "too_few_examples", "dataset.max_seq_length",
                                     f"at least {MIN_TRAINING_EXAMPLES} pairs within max_seq_length "
                                     f"{data_cfg.max_seq_length} (too_long: {data_cfg.too_long})",
                                     f"{len(train)} of {len(train_examples)}")])
    # Held-out pairs are scored whole where they fit, truncated where they do not (never dropped).
    val_pairs = tokenize_pairs(val_examples, renderer)
    val, _ = fit_pairs(val_pairs, max_seq_length=data_cfg.max_seq_length, max_prompt_length=max_prompt_length,
                       too_long="truncate", need_labels=need_labels)
    kept = {pair.line for pair in val}
    val_examples = [e for e in val_examples if e.line in kept]
    job.note(f"dataset ready: {len(train)} training and {len(val)} validation pairs ({renderer.template} template)",
             kind="dataset", format="preference", template=renderer.template, train_examples=len(train),
             validation_examples=len(val), **stats.to_dict())
    return PreferenceData(model_dir, tokenizer, renderer, train, val, val_examples)
