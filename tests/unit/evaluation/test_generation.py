"""Batched evaluation generation gives the answers of one-prompt-at-a-time greedy generation, in order."""

import pytest
import torch

from tuneforge.evaluation.generation import generate_batched, greedy_decode, left_padded, stop_token_ids

PROMPTS = ["<|im_start|>user\nOlga, a 69-year-old teacher from Lima, wrote the letter.<|im_end|>\n<|im_start|>assistant\n",
           "hi", "At 38, Kenji moved to Gdansk for work.", "a" * 40, "The quick brown fox", "x"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.model_loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_model_dir)


def one_at_a_time(model, tokenizer, prompts, max_new_tokens, stops):
    """The baseline: transformers' generate on each prompt alone, greedy, cut at the first stop token."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        answers.append(tokenizer.decode(out[:cut], skip_special_tokens=True))
    return answers


def test_batched_sorted_generation_equals_one_prompt_at_a_time_in_the_prompts_order(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    expected = one_at_a_time(model, tokenizer, PROMPTS, 12, stops)
    for batch_size in (1, 4, 16):
        result = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size)
        assert result.texts == expected
        assert result.new_tokens == 12 * len(PROMPTS)  # a random tiny model never says EOS


def test_a_row_that_stops_leaves_the_batch_without_changing_the_others(tiny):
    model, tokenizer = tiny
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    input_ids, mask = left_padded(encoded, tokenizer.pad_token_id, "cpu")
    free = greedy_decode(model, input_ids, mask, 10, stops=[-1])  # nothing stops: every row runs 10 tokens
    # Make the third token of row 1 a stop token: row 1 ends there, the others run on.
    stop = free[1][2]
    stopped = greedy_decode(model, input_ids, mask, 10, stops=[stop])
    for row, (a, b) in enumerate(zip(free, stopped)):
        cut = next((i for i, t in enumerate(a) if t == stop), None)
        assert b == (a if cut is None else a[: cut + 1]), row
    assert len(stopped[1]) <= 3 and any(len(s) == 10 for s in stopped)
    # transformers' batched generate agrees, row by row.
    reference = one_at_a_time(model, tokenizer, PROMPTS, 10, [stop])
    assert [tokenizer.decode([t for t in s if t != stop]) for s in stopped] == reference


def test_generation_stops_when_every_answer_has_ended(tiny):
    model, tokenizer = tiny
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    input_ids, mask = left_padded(encoded, tokenizer.pad_token_id, "cpu")
    first = [answer[0] for answer in greedy_decode(model, input_ids, mask, 1, stops=[-1])]
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        answers = greedy_decode(model, input_ids, mask, 50, stops=first)
    finally:
        handle.remove()
    assert [len(a) for a in answers] == [1, 1, 1] and len(calls) == 1  # the prefill only

