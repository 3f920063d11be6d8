"""Peak memory of one forward + backward: tuneforge's fused chunked loss vs `model(labels=...)`.

    .venv/bin/python bench/loss_memory.py [--model smollm2-135m-instruct] [--batch 8] [--seq-len 512]

The Hugging Face loss materializes the (tokens x vocabulary) logits, upcasts them to float32 and keeps
them for backward, plus their gradient: for SmolLM2's 49,152-token vocabulary and 8 x 512 tokens that is
0.8 GB per copy. tuneforge's CausalLMLoss (engine/loss.py) skips prompt positions before the LM head and
computes the rest in chunks with the gradient taken on the spot. Each variant runs in its own process
(LoRA on every linear layer, fp32, half of every row is prompt); printed: the peak resident set during
forward + backward above the resident set just before it (VmHWM, reset first), the loss of both (they
must agree), and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(variant: str, model_name: str, batch: int, seq_len: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.loss import CausalLMLoss
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_base_model(model_name), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    vocab = model.config.vocab_size
    # Its own generator: the same tokens in both processes, whatever model loading drew from the global RNG.
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the prompt half carries no loss
    # Warm the kernels on a small batch so first-use buffers are not counted as the loss's.
    CausalLMLoss(model)(input_ids=input_ids[:1, :16], labels=labels[:1, :16])[0].backward()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS:")
    if variant == "tuneforge":
        loss_sum, tokens, _ = CausalLMLoss(model)(input_ids=input_ids, labels=labels)
        loss = loss_sum / tokens
    else:
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    print(json.dumps({"variant": variant, "peak_bytes": _status("VmHWM:") - before, "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.batch, args.seq_len)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    results = {}
    for variant in ("transformers", "tuneforge"):
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--model", args.model, "--batch",
                              str(args.batch), "--seq-len", str(args.seq_len)], env=env, check=True,
                             capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:<13} peak above baseline {results[variant]['peak_bytes'] / MiB:8.0f} MiB   "
              f"loss {results[variant]['loss']:.6f}", flush=True)
    ratio = results["tuneforge"]["peak_bytes"] / results["transformers"]["peak_bytes"]
    print(f"tuneforge / transformers peak memory of forward + backward: {ratio:.3f} "
          f"({args.model}, batch {args.batch} x {args.seq_len}, LoRA all-linear, fp32)")


if __name__ == "__main__":
    main()
