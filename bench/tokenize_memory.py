"""Peak memory of tokenizing a dataset larger than the memory it is allowed: the streamed tokenization
cache (data/cache.py) against the in-memory path it replaced (every example, then every tokenized example,
then the concatenated arrays), on the same generated chat file with the byte-level tokenizer (one token per
byte, so the token arrays are ~8x the file: a 200 MB file makes 1.6 GB of arrays).

Each side runs in a fresh process; its peak RSS (ru_maxrss) is measured after the imports, so the figure
is what tokenizing costs. Prints the two peaks, their ratio and the token-array size over the limit.

    .venv/bin/python bench/tokenize_memory.py [--mb 200] [--limit-mb 256]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, os
os.environ["TUNEFORGE_HOME"] = sys.argv[3]
from tuneforge.data.templating import PromptRenderer
from tuneforge.engine.tiny_model import build_byte_tokenizer
from tuneforge.data.cache import load_tokenized
from tuneforge.data.loading import load_examples
from tuneforge.data.parallel import pack_arrays
renderer = PromptRenderer(build_byte_tokenizer(), "chat")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[2] == "streamed":
    dataset = load_tokenized(sys.argv[1], "chat", renderer)
    tokens = int(dataset.offsets[-1])
else:  # the path before streaming: all examples, all tokenized examples, then the arrays
    examples, _ = load_examples(sys.argv[1], "chat")
    tokens = int(pack_arrays(list(renderer.tokenize_stream(examples, 512)))["offsets"][-1])
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"imports_kb": before, "peak_kb": peak, "tokens": tokens}))
"""


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    words = "data model token train loss batch layer weight vector query answer river mountain music".split()
    written = count = 0
    with open(path, "w") as handle:
        while written < megabytes * (1 << 20):
            question = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(5, 200)))
            line = json.dumps({"messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}) + "\n"
            handle.write(line)
            written += len(line)
            count += 1
    return count


def run(path: Path, mode: str, home: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(home)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="size of the generated JSONL file")
    parser.add_argument("--limit-mb", type=float, default=256.0, help="the resident memory tokenizing may use")
    parser.add_argument("--skip-baseline", action="store_true", help="only the streamed path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        examples = generate(path, args.mb)
        streamed = run(path, "streamed", Path(tmp) / "home")
        print(f"file: {args.mb:g} MB, {examples} chat examples; limit: {args.limit_mb:g} MB resident")
        if "error" in streamed:
            print("streamed failed:", streamed["error"])
            return
        arrays_mb = streamed["tokens"] * 8 / (1 << 20)
        grow = (streamed["peak_kb"] - streamed["imports_kb"]) / 1024
        print(f"token arrays: {arrays_mb:.0f} MB ({arrays_mb / args.limit_mb:.1f}x the limit)")
        print(f"streamed:  peak RSS {streamed['peak_kb'] / 1024:.0f} MB ({grow:.0f} MB over the imports); "
              f"{'within' if streamed['peak_kb'] / 1024 <= args.limit_mb else 'OVER'} the limit")
        if not args.skip_baseline:
            baseline = run(path, "in-memory", Path(tmp) / "home-2")
            if "error" in baseline:
                print("in-memory failed:", baseline["error"])
                return
            print(f"in-memory: peak RSS {baseline['peak_kb'] / 1024:.0f} MB; "
                  f"ratio streamed / in-memory = {streamed['peak_kb'] / baseline['peak_kb']:.2f}")


if __name__ == "__main__":
    main()
