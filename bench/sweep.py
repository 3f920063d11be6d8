"""Does a sweep find a better model than the defaults, and does TPE with pruning get there cheaper than a grid?

    .venv/bin/python bench/sweep.py [--model smollm2-135m-instruct] [--steps 20] [--trials 4]

On the bundled SmolLM2-135M-Instruct and the example task (examples/json-extraction), three runs of
`tuneforge sweep run` (the real driver, a local worker, trials as jobs, in a fresh TUNEFORGE_HOME):
the default config alone (one trial), a grid over the learning rate and the LoRA rank (no pruning), and
TPE with a pruner (--pruner, median by default, --warmup trials before it judges) over the same ranges
(continuous) with as many trials as the grid has points (--trials).
It prints, for each, the trials, the device-hours they used (CPU-hours on a machine without a GPU, from
the jobs' own accounting), the best validation loss, and the device-hours TPE needed to reach the grid's
best (trials in the order they started). The numbers that matter are the losses and the ratio of hours,
both measured in the same invocation; the absolute hours depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "json-extraction"
# The grid's learning rates span two decades so that its best point lies inside the range TPE searches (an
# earlier grid of 3e-4..3e-3 had its best at the top edge, a corner a log-uniform search reaches rarely).
RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
RANKS = [4, 16]


def base(model: str, steps: int, eval_examples: int) -> dict:
    return {"model": {"base_model": model},
            "dataset": {"path": str(DATA / "train.jsonl"), "validation_path": str(DATA / "val.jsonl"),
                        "max_seq_length": 512},
            "training": {"max_steps": steps, "batch_size": 2, "per_device_batch_size": 2, "seed": 42},
            "evaluation": {"metrics": ["loss"], "eval_every_steps": max(1, steps // 4), "max_eval_examples": eval_examples,
                           "eval_before_training": False},
            "checkpoint": {"every_steps": steps}}


def sweeps(model: str, steps: int, trials: int, pruner: str = "median", warmup: int = 2,
           eval_examples: int = 48, rates: list[float] = RATES, ranks: list[int] = RANKS) -> dict[str, dict]:
    common = {"base": base(model, steps, eval_examples), "objectives": [{"metric": "loss", "direction": "min"}], "parallelism": 1}
    return {
        "default config": {**common, "name": "default", "sampler": "grid",
                           "space": {"training.seed": {"type": "choice", "values": [42]}}},
        "grid": {**common, "name": "grid", "sampler": "grid", "space": {
            "training.learning_rate": {"type": "choice", "values": rates},
            "adapter.rank": {"type": "choice", "values": ranks}}},
        "tpe + pruner": {**common, "name": "tpe", "sampler": "tpe", "pruner": pruner,
                         "pruner_warmup_trials": warmup, "budget": {"max_trials": trials}, "seed": 0, "space": {
                                    "training.learning_rate": {"type": "log_uniform", "low": min(rates), "high": max(rates)},
                                    "adapter.rank": {"type": "int", "low": min(ranks), "high": max(ranks)}}},
    }


def run(name: str, spec: dict, home: Path) -> list[tuple[int, str, float | None, float]]:
    """Run one sweep here; (trial, status, loss, device-seconds) in the order the trials started."""
    path = home / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print(f"== {name}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "tuneforge.cli", "sweep", "run", str(path), "--cpu-slots", "1"], env=env,
                   check=True, stdout=sys.stderr)
    with sqlite3.connect(home / "tuneforge.db") as db:
        rows = db.execute(
            "SELECT t.number, t.status, t.\"values\", j.gpu_seconds FROM sweep_trials t JOIN sweeps s ON s.id = t.sweep_id "
            "LEFT JOIN jobs j ON j.id = t.job_id WHERE s.name = ? ORDER BY t.number", (spec["name"],)).fetchall()
    import json

    return [(n, status, (json.loads(values) or [None])[0] if values else None, seconds or 0.0)
            for n, status, values, seconds in rows]


def hours_to_reach(trials, target: float) -> float | None:
    used = 0.0
    for _, _, loss, seconds in trials:
        used += seconds
        if loss is not None and loss <= target + 1e-9:
            return used / 3600
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="the grid's learning rates (TPE: their range)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="the grid's LoRA ranks (TPE: their range)")
    parser.add_argument("--eval-examples", type=int, default=48,
                        help="validation examples per evaluation (the task's whole validation set: 48)")
    parser.add_argument("--trials", type=int, default=None, help="TPE trials (default: the grid's size)")
    parser.add_argument("--pruner", default="median", choices=["none", "median", "successive_halving", "hyperband"])
    parser.add_argument("--warmup", type=int, default=2, help="the pruner's warm-up trials (median)")
    parser.add_argument("--only", default=None, help="run only these (comma-separated: default,grid,tpe)")
    parser.add_argument("--grid-best", type=float, default=None,
                        help="the grid's best loss from an earlier run, when --only leaves the grid out")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    chosen = sweeps(args.model, args.steps, args.trials or len(rates) * len(ranks), args.pruner, args.warmup,
                    args.eval_examples, rates, ranks)
    if args.only:
        keys = {"default": "default config", "grid": "grid", "tpe": "tpe + pruner"}
        chosen = {keys[k]: chosen[keys[k]] for k in args.only.split(",")}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        home = Path(tmp)
        results = {name: run(name, spec, home) for name, spec in chosen.items()}
    best = {name: min((t[2] for t in trials if t[2] is not None), default=None) for name, trials in results.items()}
    grid_best = best.get("grid", args.grid_best)
    print(f"\n{args.model}, examples/json-extraction, {args.steps} steps per trial; validation loss (lower is better)\n")
    print("| run | trials (pruned) | device-hours | best loss | device-hours to reach the grid's best |")
    print("|---|---|---|---|---|")
    for name, trials in results.items():
        pruned = sum(t[1] == "pruned" for t in trials)
        hours = sum(t[3] for t in trials) / 3600
        reach = hours_to_reach(trials, grid_best) if grid_best is not None and name != "default config" else None
        reach_text = "-" if name == "default config" else (f"{reach:.4f}" if reach is not None else "not reached")
        print(f"| {name} | {len(trials)} ({pruned}) | {hours:.4f} | "
              f"{best[name]:.4f} | {reach_text} |" if best[name] is not None else f"| {name} | {len(trials)} | - | - | - |")
    grid_hours = hours_to_reach(results["grid"], grid_best) if "grid" in results else None
    tpe_hours = hours_to_reach(results["tpe + pruner"], grid_best) if "tpe + pruner" in results else None
    if grid_hours and tpe_hours:
        # The grid knows its best only once every point has run: its whole cost is the fair baseline.
        grid_total = sum(t[3] for t in results["grid"]) / 3600
        print(f"\nTPE + pruning reached the grid's best in {tpe_hours:.4f} device-hours: {tpe_hours / grid_total:.2f}x "
              f"the whole grid's, {tpe_hours / grid_hours:.2f}x the grid's until its best point ran")
    if best.get("default config") is not None and grid_best is not None:
        print(f"best of the grid vs the default config: {grid_best:.4f} vs {best['default config']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
