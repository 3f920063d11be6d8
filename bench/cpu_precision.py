"""Should CPU training default to bf16? fp32 against bf16 autocast on the same job, in one invocation.

    .venv/bin/python bench/cpu_precision.py [--steps 40] [--adapter lora] [--examples 300]

Trains the bundled SmolLM2-135M-Instruct on the json-extraction task (examples/json-extraction: 300 short
chats, 48 held out) with `tuneforge train` once per precision (`training.precision=fp32` and `bf16`), the
same seed, data order and hyperparameters otherwise, and prints for each: the median real tokens/s of the
training loop (step 1, the warm-up, left out), the model FLOP utilization the recipe reports, peak RSS, the
final validation loss and exact match, and the largest gap between the two per-step training-loss curves
(absolute and relative to the fp32 loss). bf16 runs on this CPU's AMX / AVX512-BF16 matmuls through oneDNN
(`lscpu` flags amx_bf16, avx512_bf16); on a CPU without them bf16 is emulated and slower.
Run it alone on the machine: the tokens/s ratio is what matters, and it is measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "json-extraction"


def train(precision: str, work: Path, args) -> dict:
    job_dir = work / precision
    spec = job_dir.with_suffix(".yaml")
    head = "\n".join(open(DATA / "train.jsonl", encoding="utf-8").read().splitlines()[: args.examples])
    (work / "train.jsonl").write_text(head + "\n", encoding="utf-8")
    spec.write_text(
        f"dataset: {{path: {work / 'train.jsonl'}, validation_path: {DATA / 'val.jsonl'}}}\n"
        f"adapter: {{type: {args.adapter}}}\n"
        f"training: {{max_steps: {args.steps}, precision: {precision}, seed: 7}}\n"
        "evaluation: {metrics: [loss, exact_match], max_new_tokens: 48, eval_before_training: false, "
        "max_eval_examples: 48}\n")
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(spec), "--job-dir", str(job_dir)]
    started = time.monotonic()
    with open(job_dir.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{precision} failed:\n{job_dir.with_suffix('.log').read_text()[-1500:]}")
    summary = json.loads((job_dir / "summary.json").read_text())
    metrics = [json.loads(line)["data"] for line in (job_dir / "events.jsonl").read_text().splitlines()
               if json.loads(line).get("type") == "metrics"]
    steps = [m for m in metrics if "train_loss" in m]
    later = [m for m in steps if m["step"] > 1]
    return {"losses": {m["step"]: m["train_loss"] for m in steps},
            "tokens_per_s": statistics.median(m["tokens_per_second"] for m in later),
            "mfu": statistics.median(m["mfu"] for m in later) if later and "mfu" in later[0] else None,
            "peak_rss_gib": usage.ru_maxrss / (1 << 20), "wall_s": time.monotonic() - started,
            "eval": summary["eval"]["fine_tuned"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--adapter", default="lora", choices=["lora", "full"])
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        runs = {p: train(p, Path(tmp), args) for p in ("fp32", "bf16")}
    print(f"SmolLM2-135M-Instruct, {args.adapter}, json-extraction ({args.examples} chats), {args.steps} steps, "
          f"all else auto\n")
    print("| precision | real tokens/s | MFU | peak RSS | val loss | exact match |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {mfu} | {r['peak_rss_gib']:.1f} GiB | {r['eval']['loss']:.4f} | "
              f"{r['eval']['exact_match']:.2f} |")
    fp32, bf16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    gaps = [(abs(bf16[s] - fp32[s]), abs(bf16[s] - fp32[s]) / max(abs(fp32[s]), 1e-9), s) for s in fp32 if s in bf16]
    worst, worst_rel = max(gaps), max(gaps, key=lambda g: g[1])
    print(f"\nbf16 / fp32 real tokens/s: {runs['bf16']['tokens_per_s'] / runs['fp32']['tokens_per_s']:.2f}x")
    print(f"largest training-loss gap: {worst[0]:.4f} at step {worst[2]}; largest relative gap {worst_rel[1]:.1%} at "
          f"step {worst_rel[2]}; final losses fp32 {fp32[max(fp32)]:.4f}, bf16 {bf16[max(bf16)]:.4f}")


if __name__ == "__main__":
    main()
