"""The data pipeline against its baseline, in one run:

1. validate + tokenize throughput (examples/s, MB/s) of tuneforge (streaming validation, chat template,
   assistant-only loss masks, cache write) vs `datasets.load_dataset("json")` + `map(batched=True)` with
   `apply_chat_template(tokenize=True)` (no validation, no masks), same tokenizer and template, on a
   generated dataset of chat examples of varied lengths; the ratio is tuneforge / datasets;
2. peak memory (max RSS of a fresh process) of `tuneforge data validate` on a file of about 1 GB;
3. the real-token fraction of packed batches vs padded batches on the same data.

    .venv/bin/python bench/data_pipeline.py [--examples 100000] [--big-gb 1.0] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("data model token train loss batch layer weight vector query answer number city river mountain "
         "music paper science market garden window morning evening system reason simple").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def generate(path: Path, count: int, seed: int = 0) -> None:
    """Chat examples with a long-tailed length distribution, like real instruction data."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(count):
            turns = rng.choice((1, 1, 1, 2, 3))
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(turns):
                messages.append({"role": "user", "content": sentence(rng, int(rng.lognormvariate(2.5, 0.8)) + 3)})
                messages.append({"role": "assistant", "content": sentence(rng, int(rng.lognormvariate(3.5, 0.9)) + 3)})
            handle.write(json.dumps({"id": i, "messages": messages}) + "\n")


def tuneforge_pass(path: Path, model: str) -> float:
    from tuneforge.data.cache import load_tokenized
    from tuneforge.data.templating import PromptRenderer
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.model_loading import load_tokenizer

    renderer = PromptRenderer(load_tokenizer(resolve_base_model(model)), "chat")
    root = Path(tempfile.mkdtemp(prefix="tf-cache-"))
    started = time.perf_counter()
    dataset = load_tokenized(path, "chat", renderer, root=root)
    elapsed = time.perf_counter() - started
    assert not dataset.cache_hit
    shutil.rmtree(root)
    return elapsed


def datasets_pass(path: Path, model: str) -> float:
    import datasets

    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.model_loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_base_model(model))
    cache = tempfile.mkdtemp(prefix="hf-cache-")
    datasets.disable_progress_bars()
    started = time.perf_counter()
    data = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
    data = data.map(lambda batch: {"input_ids": tokenizer.apply_chat_template(batch["messages"], tokenize=True,
                                                                              return_dict=False)},
                    batched=True, remove_columns=data.column_names)
    elapsed = time.perf_counter() - started
    assert len(data) > 0
    shutil.rmtree(cache)
    return elapsed


def validate_peak_rss(path: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `tuneforge data validate` in a fresh process."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child started by
    # this (large, tokenizer-holding) process would report the parent's resident set as its own peak.
    code = ("import sys, time; from tuneforge.data.validation import validate_file; "
            "t = time.perf_counter(); r = validate_file(sys.argv[1]); "
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')); "
            "print(time.perf_counter() - t, hwm / 1024, r.examples)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    seconds, rss, _ = out.split()
    return float(seconds), float(rss)


def packing_fractions(path: Path, model: str, max_seq_length: int, batch_size: int) -> dict:
    from tuneforge.data.cache import load_tokenized
    from tuneforge.data.templating import PromptRenderer
    from tuneforge.data.validation import padding_fractions
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.model_loading import load_tokenizer

    renderer = PromptRenderer(load_tokenizer(resolve_base_model(model)), "chat")
    dataset = load_tokenized(path, "chat", renderer)
    return padding_fractions(dataset.lengths, max_seq_length, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of the file for the memory check (0 skips)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from tuneforge.engine.quiet import quiet_libraries

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="tf-bench-data-"))
    try:
        data = work / "chat.jsonl"
        generate(data, args.examples)
        megabytes = data.stat().st_size / 2**20
        print(f"dataset: {args.examples:,} chat examples, {megabytes:.0f} MB")
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternate, keep the best of each
            ours.append(tuneforge_pass(data, args.model))
            theirs.append(datasets_pass(data, args.model))
        best_ours, best_theirs = min(ours), min(theirs)
        print(f"1. validate + tokenize ({args.rounds} alternating rounds, best of each)")
        print(f"   tuneforge          {args.examples / best_ours:9,.0f} examples/s  {megabytes / best_ours:6.1f} MB/s "
              "(validation, loss masks, cache write)")
        print(f"   datasets.map       {args.examples / best_theirs:9,.0f} examples/s  {megabytes / best_theirs:6.1f} MB/s "
              "(tokenize only)")
        print(f"   ratio tuneforge / datasets: {best_theirs / best_ours:.2f}x")

        fractions = packing_fractions(data, args.model, 2048, 8)
        print(f"3. real tokens per batch of 8 at max_seq_length 2048: padded {fractions['padded_real_fraction']:.3f}, "
              f"packed {fractions['packed_real_fraction']:.3f} ({fractions['packed_rows']:,} rows)")

        if args.big_gb:
            big = work / "big.jsonl"
            count = int(args.examples * args.big_gb * 1024 / megabytes)
            with open(big, "w") as out:
                while big.stat().st_size < args.big_gb * 2**30:
                    with open(data) as source:
                        shutil.copyfileobj(source, out)
                    out.flush()
            seconds, rss = validate_peak_rss(big)
            size = big.stat().st_size / 2**30
            print(f"2. data validate on {size:.2f} GB (~{count:,} examples): {seconds:.0f}s, "
                  f"{size * 1024 / seconds:.0f} MB/s, peak RSS {rss:.0f} MiB (target < 500)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
