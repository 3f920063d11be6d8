"""Batched greedy generation for evaluation: where generation-based evaluation spends its time.

Prompts are sorted by length (longest first) so each batch holds prompts of similar length and little
left padding, generated with a KV cache, and a sequence that reached EOS leaves the batch (its rows of
the cache are dropped), so it stops costing compute; the batch ends when every sequence has. Answers
come back in the order of the prompts. Decoding is pure greedy (argmax): a model's generation_config
sampling settings and penalties are not applied, so scores are reproducible and comparable between
models. bench/eval_speed.py measures it against transformers' generate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generations:
    texts: list[str]  # one answer per prompt, in the order of the prompts
    new_tokens: int  # tokens generated over all prompts, each answer's stop token included


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and whatever the model's generation config adds
    (chat models often stop on an end-of-turn token as well)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16,
             add_special_tokens: bool = False, device=None, synced: bool = False) -> list[str]:
    """Greedy answers to prompts, in their order (see generate_batched)."""
    return generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            add_special_tokens=add_special_tokens, device=device, synced=synced).texts


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16,
                     add_special_tokens: bool = False, device=None, synced: bool = False) -> Generations:
    """Greedy answers, batch_size prompts at a time, stopping each at its first stop token.

    synced: other ranks generate at the same time from a sharded model, so every rank keeps running
    forward passes until all are done (transformers' generate with synced_gpus; no rows are dropped,
    since every rank must run the same passes)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    answers: list[list[int]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = left_padded([encoded[i] for i in rows], pad_id, device)
            if synced:
                tokens = _transformers_greedy(model, input_ids, attention_mask, max_new_tokens, stops, pad_id,
                                              synced=True)
            else:
                tokens = greedy_decode(model, input_ids, attention_mask, max_new_tokens, stops)
            for row, answer in zip(rows, tokens):
                answers[row] = answer
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode([_until_stop(a, stops) for a in answers], skip_special_tokens=True)
    return Generations(texts, sum(len(a) for a in answers))


def left_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch, so every prompt ends where generation starts."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, length - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  stops: list[int]) -> list[list[int]]:
    """Greedy decoding with a KV cache; a row that emits a stop token leaves the batch (and the cache).

    Returns each row's new tokens, its stop token last when it stopped."""
    batch = input_ids.shape[0]
    device = input_ids.device
    stop_ids = torch.tensor(stops, device=device)
    # Left padding: a prompt's first real token is position 0, as it would be alone.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache_name = _cache_argument(model)
    cache = getattr(out, cache_name, None)
    if cache is None:  # a model that keeps no KV cache of its own: transformers' loop knows how to drive it
        return _transformers_greedy(model, input_ids, attention_mask, max_new_tokens, stops, stops[0], synced=False)
    droppable = _rows_can_be_dropped(cache)
    alive = torch.arange(batch, device=device)  # which original rows the batch still holds
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, their new token) of each step, kept on the device
    position = positions[:, -1:]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tokens = out.logits[:, -1, :].argmax(dim=-1)
        finished = torch.isin(next_tokens, stop_ids)
        steps.append((alive, next_tokens))
        if not droppable:  # finished rows keep running; their answers are cut at the stop token below
            finished = done = done | finished
        stopped = int(finished.sum())  # the one device-to-host sync of a step
        if step == max_new_tokens - 1 or stopped == finished.shape[0]:
            break
        if droppable and stopped:
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, next_tokens = alive[keep], next_tokens[keep]
            attention_mask, position = attention_mask[keep], position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        position = position + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position,
                    use_cache=True, **{cache_name: cache})
        cache = getattr(out, cache_name)
    answers: list[list[int]] = [[] for _ in range(batch)]
    for rows, tokens in steps:
        for row, token in zip(rows.tolist(), tokens.tolist()):
            answers[row].append(token)
    return [_until_stop(a, stops, keep_stop=True) for a in answers]


def _cache_argument(model) -> str:
    """What this transformers version calls the KV cache, in a model's arguments and outputs: `cache`
    (5.x, where `past_key_values` is deprecated) or `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _rows_can_be_dropped(cache) -> bool:
    """Whether every layer of this cache can shrink to a subset of its batch rows."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(isinstance(layer, DynamicLayer) for layer in layers)


def _transformers_greedy(model, input_ids, attention_mask, max_new_tokens, stops, pad_id, *,
                         synced: bool) -> list[list[int]]:
    from transformers import GenerationConfig

    # A fresh config: the model's own may carry sampling settings or penalties that greedy evaluation
    # must not apply.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad_id,
                              use_cache=True)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               synced_gpus=synced)
    new = generated[:, input_ids.shape[1] :].tolist()
    return [_until_stop(tokens, stops, keep_stop=True) for tokens in new]


def _until_stop(tokens: list[int], stops: list[int], *, keep_stop: bool = False) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[: index + 1] if keep_stop else tokens[:index]
    return tokens
