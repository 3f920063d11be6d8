"""On a CUDA machine: QLoRA and LoRA steps of SmolLM2-135M and a ~1B Llama, measured beside the planner.

    .venv/bin/python bench/gpu_check.py [--seq-len 1024] [--batch 4] [--steps 6] [--budget-s 270] [--json OUT]

Uses tuneforge's own engine (model_loading.load_base_model, adapters.make_trainable, loss.CausalLMLoss,
optim.build_optimizer) in bf16, with SDPA and, when installed, flash attention; the ~1B Llama (TinyLlama-1.1B's
shape) is built from a config with random weights, nothing is downloaded. Prints tokens/s, peak memory
(torch.cuda.max_memory_allocated) and MFU next to the planner's estimates. Exits 1 without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
# TinyLlama-1.1B's published config: a ~1B Llama that fits any GPU.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)


def gpu_type(torch) -> str | None:
    """The planner's name for the local GPU, or None when it has no entry for it."""
    name = torch.cuda.get_device_name(0).lower()
    total = torch.cuda.get_device_properties(0).total_memory
    for key, planner_name in (("h200", "h200"), ("h100", "h100-80gb"), ("b200", "b200"), ("l4", "l4"),
                              ("a10g", "a10g"), ("t4", "t4")):
        if key in name:
            return planner_name
    if "a100" in name:
        return "a100-80gb" if total > 60 * GiB else "a100-40gb"
    return None


def build_llama_1b(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.engine.tiny_model import build_byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)  # load_base_model needs none; kept for a loadable directory
    del model
    torch.cuda.empty_cache()
    return directory


def run_config(model_dir: Path, preset, method: str, attention: str, args, planner_gpu: str | None) -> dict:
    """Build the model the way the recipe does, take warm-up and timed steps, measure and plan."""
    import torch

    from tuneforge.engine.adapters import make_trainable
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.engine.model_loading import load_base_model
    from tuneforge.engine.optim import build_optimizer
    from tuneforge.engine.precision import Precision
    from tuneforge.planner import TrainingSetup, estimate_memory, estimate_throughput
    from tuneforge.planner.hardware import GPUS
    from tuneforge.planner.throughput import flops_per_token
    from tuneforge.spec.job import AdapterSpec, ModelSpec, TrainingSpec

    device = torch.device("cuda", 0)
    precision = Precision("bf16", device)
    quantized = method == "qlora"
    model_spec = ModelSpec(base_model=str(model_dir), quantization="nf4" if quantized else "none",
                           attn_implementation=attention)
    model = load_base_model(model_dir, model_spec, precision, full_finetune=False)
    model = make_trainable(model, AdapterSpec(type=method, rank=16, alpha=32, dropout=0.05), quantized=quantized,
                           gradient_checkpointing=False)
    model.train()
    loss_module = CausalLMLoss(model)
    optimizer = build_optimizer(model, TrainingSpec(optimizer="adamw", learning_rate=1e-4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable[:4]]

    generator = torch.Generator(device="cpu").manual_seed(0)
    batch, seq = args.batch, args.seq_len
    input_ids = torch.randint(0, preset.vocab_size, (batch, seq), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -seq // 10:] = 0  # right padding, as the engine's batches have
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    tokens_per_step = int(attention_mask.sum())

    def step() -> float:
        with precision.autocast():
            loss_sum, count, _ = loss_module(input_ids, attention_mask, labels)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(2):  # warm-up: kernels, allocator, the optimizer's state
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated()
    changed = any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable[:4]))
    if not all(math.isfinite(x) for x in losses) or not changed:
        raise RuntimeError(f"training is broken: losses {losses}, adapter weights changed: {changed}")

    setup = TrainingSetup(method=method, gpu=planner_gpu or "h100-80gb", precision="bf16", seq_len=seq,
                          micro_batch=batch, attention=attention, lora_rank=16, lora_dropout=0.05)
    estimate = estimate_memory(preset, setup)
    throughput = estimate_throughput(preset, setup)
    model_flops, _ = flops_per_token(preset, setup)
    tokens_per_second = tokens_per_step * args.steps / elapsed
    peak_flops = GPUS[planner_gpu].peak_flops if planner_gpu else None
    del model, loss_module, optimizer
    torch.cuda.empty_cache()
    return {
        "model": preset.name, "method": method, "attention": attention,
        "tokens_per_second": tokens_per_second, "planner_tokens_per_second": throughput.tokens_per_second_per_gpu,
        "peak_allocated": peak, "planner_peak_allocated": estimate.peak_allocated,
        "memory_error": (estimate.peak_allocated - peak) / peak,
        "mfu": tokens_per_second * model_flops / peak_flops if peak_flops else None,
        "planner_mfu": throughput.mfu, "final_loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip configurations that would start later")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
              "with a CUDA build of torch (scripts/bootstrap with TORCH_SPEC).", file=sys.stderr)
        return 1
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.quiet import quiet_libraries
    from tuneforge.planner import PRESETS, arch_from_config

    quiet_libraries()
    started = time.monotonic()
    planner_gpu = gpu_type(torch)
    print(f"device: {torch.cuda.get_device_name(0)} -> planner type {planner_gpu or 'unknown (h100-80gb figures)'}; "
          f"torch {torch.__version__}; micro-batch {args.batch} x {args.seq_len} tokens, {args.steps} timed steps")
    attentions = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    if len(attentions) == 1:
        print("flash_attn is not installed: SDPA only")
    rows, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        models = [(resolve_base_model("smollm2-135m-instruct"), PRESETS["smollm2-135m"])]
        llama_dir = build_llama_1b(Path(scratch) / "llama-1b")
        models.append((llama_dir, arch_from_config(LLAMA_1B, "llama-1.1b")))
        header = (f"{'model':<14}{'method':<7}{'attention':<18}{'tokens/s':>10}{'planner':>10}"
                  f"{'peak GiB':>10}{'planner':>9}{'error':>8}{'MFU':>7}{'planner':>8}")
        print(header)
        for model_dir, preset in models:
            for method in ("qlora", "lora"):
                for attention in attentions:
                    if time.monotonic() - started > args.budget_s:
                        print(f"{preset.name:<14}{method:<7}{attention:<18}skipped: past the {args.budget_s:.0f} s budget")
                        continue
                    try:
                        row = run_config(model_dir, preset, method, attention, args, planner_gpu)
                    except Exception as exc:  # one broken kernel should not hide the other rows
                        failures += 1
                        print(f"{preset.name:<14}{method:<7}{attention:<18}FAILED: {type(exc).__name__}: {exc}"[:300])
                        torch.cuda.empty_cache()
                        continue
                    rows.append(row)
                    mfu = f"{row['mfu']:.0%}" if row["mfu"] is not None else "-"
                    print(f"{row['model']:<14}{method:<7}{attention:<18}{row['tokens_per_second']:>10,.0f}"
                          f"{row['planner_tokens_per_second'] or 0:>10,.0f}{row['peak_allocated'] / GiB:>10.2f}"
                          f"{row['planner_peak_allocated'] / GiB:>9.2f}{row['memory_error']:>+8.0%}{mfu:>7}"
                          f"{row['planner_mfu'] or 0:>8.0%}", flush=True)
    print(f"{len(rows)} configurations measured, {failures} failed, in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
