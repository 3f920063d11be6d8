"""Greedy generation on validation prompts and the exact-match score against the reference answers."""

from __future__ import annotations

import torch


def normalize_answer(text: str) -> str:
    """Whitespace-insensitive comparison: a trailing newline is not a wrong answer."""
    return " ".join(text.split())


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16,
             add_special_tokens: bool = False, device=None, synced: bool = False) -> list[str]:
    """Greedy completions, stopping at EOS; prompts are left-padded so a batch ends aligned.

    synced: other ranks generate at the same time from a sharded model, so every rank keeps running
    forward passes until all are done (transformers' synced_gpus)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = device or next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)
