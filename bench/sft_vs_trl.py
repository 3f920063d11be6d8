"""tuneforge's SFT recipe vs a plain TRL SFTTrainer + PEFT script: same model, data, steps, batch, LoRA.

    .venv/bin/python bench/sft_vs_trl.py [--model smollm2-135m-instruct] [--steps 10] [--rounds 2]

Both run in fresh processes, alternating, on single-turn chat data of varied lengths (a long-tailed
distribution, like real instruction data), with the loss on the reply only (TRL: prompt-completion
conversational data, completion_only_loss). Printed: real (non-padding) tokens per second of the
training loop, peak memory (max RSS of the process), the ratios tuneforge / TRL, and the start-up time
to the first optimizer step. Without packing, and with packing (TRL: packing=True, best-fit decreasing,
padding-free; tuneforge: best-fit decreasing with a block-diagonal mask, since padding-free without
flash-attention lets packed examples attend to each other on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("data model token train loss batch layer weight vector query answer number city river mountain "
         "music paper science market garden window morning evening system reason simple").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def generate(directory: Path, count: int, max_words: int, seed: int = 0) -> tuple[Path, Path]:
    """The same examples twice: chat records for tuneforge, prompt/completion messages for TRL.

    A quarter of the replies are near the length limit, so that both trainers meet batches padded to
    the limit in the first steps whatever their shuffles: peak memory is then compared on equal shapes."""
    rng = random.Random(seed)
    chat, pairs = directory / "chat.jsonl", directory / "prompt_completion.jsonl"
    with open(chat, "w") as chat_file, open(pairs, "w") as pair_file:
        for _ in range(count):
            user = {"role": "user", "content": sentence(rng, min(40, int(rng.lognormvariate(2.5, 0.7)) + 3))}
            words = max_words if rng.random() < 0.25 else min(max_words, int(rng.lognormvariate(3.2, 0.9)) + 3)
            reply = {"role": "assistant", "content": sentence(rng, words)}
            chat_file.write(json.dumps({"messages": [user, reply]}) + "\n")
            pair_file.write(json.dumps({"prompt": [user], "completion": [reply]}) + "\n")
    return chat, pairs


def run_tuneforge(work: Path, data: Path, model: str, steps: int, packing: bool, max_len: int, batch: int,
                  precision: str, checkpointing: bool, padding_free: str = "auto") -> dict:
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    job_dir = Path(tempfile.mkdtemp(prefix="tf-job-", dir=work))
    write_spec(job_dir, validate_job_spec({
        "model": {"base_model": model},
        "dataset": {"path": str(data), "max_seq_length": max_len, "train_split": 1.0},
        "adapter": {"type": "lora", "rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"max_steps": steps, "batch_size": batch, "per_device_batch_size": batch, "learning_rate": 2e-4,
                     "warmup_ratio": 0.03, "lr_scheduler": "cosine", "packing": packing, "seed": 42,
                     "padding_free": "auto" if padding_free == "auto" else False,
                     "precision": precision, "gradient_checkpointing": checkpointing},
        "evaluation": {"metrics": [], "eval_before_training": False},
        "checkpoint": {"every_minutes": None},
    }))
    code = ("import resource, sys; sys.argv = ['sft', '--job-dir', sys.argv[1], '--no-progress'];"
            "from tuneforge.recipes.sft import main; rc = main();"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
    from tuneforge.launch.commands import recipe_environment

    # Launched as tuneforge launches recipes (tuneforge train, the scheduler's executors): same environment.
    out = subprocess.run([sys.executable, "-c", code, str(job_dir)], capture_output=True, text=True, check=True,
                         env={**os.environ, **recipe_environment()})
    rss = float(out.stdout.split("RSS")[-1])
    summary = json.loads((job_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    startup = next(e["data"] for e in events if e["data"].get("kind") == "startup")
    return {"tokens": summary["tokens_seen"], "seconds": summary["train_seconds"], "rss_mib": rss,
            "to_first_step_s": startup["to_first_step_s"],
            "startup": {k: startup[k] for k in ("imports_s", "data_s", "model_load_s", "setup_s", "first_step_s")}}


def trl_child(data: str, model_dir: str, steps: int, packing: bool, max_len: int, batch: int, precision: str,
              checkpointing: bool) -> None:
    """The baseline: what a user writes with TRL's SFTTrainer and PEFT."""
    from tuneforge.engine.progress import process_age
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    imported = process_age()

    class FirstStep(TrainerCallback):
        at = None

        def on_step_end(self, args, state, control, **kwargs):
            if FirstStep.at is None:
                FirstStep.at = process_age()

    output = tempfile.mkdtemp(prefix="trl-out-")
    config = SFTConfig(
        output_dir=output, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=2e-4, warmup_steps=0.03, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
        report_to=[], max_length=max_len, packing=packing, completion_only_loss=True, seed=42,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
        # TRL's own defaults are bf16 and gradient checkpointing: set both to what tuneforge runs with.
        bf16=precision == "bf16", gradient_checkpointing=checkpointing,
    )
    trainer = SFTTrainer(
        model=model_dir, args=config, train_dataset=load_dataset("json", data_files=data, split="train"),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[FirstStep()],
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    print("RESULT", json.dumps({"tokens": tokens, "seconds": seconds, "train_runtime": result.metrics["train_runtime"],
                                "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                "to_first_step_s": FirstStep.at, "imports_s": imported}))


def run_trl(data: Path, model_dir: Path, steps: int, packing: bool, max_len: int, batch: int, precision: str,
            checkpointing: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--trl-child", str(data), str(model_dir), str(steps),
                          str(int(packing)), str(max_len), str(batch), precision, str(int(checkpointing))],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.split("RESULT", 1)[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        data, model_dir, steps, packing, max_len, batch, precision, checkpointing = sys.argv[2:10]
        trl_child(data, model_dir, int(steps), bool(int(packing)), int(max_len), int(batch), precision,
                  bool(int(checkpointing)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="for both trainers")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for both trainers")
    parser.add_argument("--padding-free", default="auto", choices=["auto", "false"],
                        help="tuneforge's training.padding_free without packing (auto: rows shared within a micro-batch)")
    parser.add_argument("--packing-only", action="store_true")
    parser.add_argument("--no-packing-only", action="store_true")
    args = parser.parse_args()
    from tuneforge.engine.base_models import resolve_base_model

    model_dir = resolve_base_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="tf-bench-trl-"))
    # About 1.1 tokens per generated word, plus the template: the longest examples end just under the limit.
    chat, pairs = generate(work, args.examples, max_words=int(args.max_seq_length * 0.75))
    print(f"{args.model}, LoRA r16 all-linear, {args.steps} steps, batch {args.batch}, max length {args.max_seq_length}, "
          f"{args.rounds} alternating rounds (best of each), CPU {args.precision}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'} (both)")
    modes = [False] if args.no_packing_only else [True] if args.packing_only else [False, True]
    for packing in modes:
        ours, theirs = [], []
        settings = (args.steps, packing, args.max_seq_length, args.batch, args.precision, args.gradient_checkpointing)
        for _ in range(args.rounds):
            ours.append(run_tuneforge(work, chat, args.model, *settings, padding_free=args.padding_free))
            theirs.append(run_trl(pairs, model_dir, *settings))
        best_ours = max(ours, key=lambda r: r["tokens"] / r["seconds"])
        best_theirs = max(theirs, key=lambda r: r["tokens"] / r["seconds"])
        speed_ours = best_ours["tokens"] / best_ours["seconds"]
        speed_theirs = best_theirs["tokens"] / best_theirs["seconds"]
        rss_ours, rss_theirs = min(r["rss_mib"] for r in ours), min(r["rss_mib"] for r in theirs)
        print(f"\n{'with' if packing else 'without'} packing:")
        print(f"  tuneforge {speed_ours:8.0f} real tokens/s ({best_ours['tokens']:,} tokens)   peak {rss_ours:6.0f} MiB   "
              f"first step after {best_ours['to_first_step_s']:.1f}s")
        print(f"  TRL       {speed_theirs:8.0f} real tokens/s ({best_theirs['tokens']:,} tokens)   peak {rss_theirs:6.0f} MiB   "
              f"first step after {best_theirs['to_first_step_s']:.1f}s")
        print(f"  ratio tuneforge / TRL: throughput {speed_ours / speed_theirs:.2f}x, peak memory {rss_ours / rss_theirs:.2f}x")
        print(f"  tuneforge start-up: {json.dumps(best_ours['startup'])}; TRL imports took {best_theirs['imports_s']:.1f}s")


if __name__ == "__main__":
    main()
