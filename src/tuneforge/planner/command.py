"""`tuneforge plan`: the planner on the command line, as a table for people or JSON for machines."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.hardware import GiB
from tuneforge.planner.models import LINEAR_NAMES, PRESETS, format_params, load_model_arch
from tuneforge.planner.plan import Plan, plan, plan_any_gpu
from tuneforge.planner.setup import TrainingSetup

EXIT_OK, EXIT_BAD_INPUT = 0, 2
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def add_plan_command(commands) -> None:
    """Register `plan` on the tuneforge command's subparsers."""
    parser = commands.add_parser(
        "plan",
        help="estimate memory per GPU, whether a job fits, and its tokens/s and GPU-hours",
        description="Estimate a fine-tuning job's memory per GPU (weights, gradients, optimizer state, activations, "
        "buffers), say whether it fits, what to change if it does not, and how fast it will train. "
        "MODEL is a preset (" + ", ".join(PRESETS) + "), a config.json, or a local Hugging Face model directory.",
    )
    # Values are read as text and checked by the planner, so bad input is one line and exit code 2.
    parser.add_argument("--model", required=True, help="preset name, config.json path or model directory")
    parser.add_argument("--method", default="lora", help="lora, qlora or full (default lora)")
    parser.add_argument("--gpus", default="1", help="GPUs per node (default 1)")
    parser.add_argument("--gpu", default="a100-80gb", help="a100-40gb, a100-80gb, h100-80gb, h200, b200, l4, a10g, t4, "
                        "any, or cpu (this machine's RAM); default a100-80gb")
    parser.add_argument("--nodes", default="1", help="machines (default 1)")
    parser.add_argument("--seq-len", default="2048", help="tokens per sequence (default 2048)")
    parser.add_argument("--batch", default="4", help="micro-batch per GPU (default 4)")
    parser.add_argument("--grad-accum", default="1", help="gradient accumulation steps (default 1)")
    parser.add_argument("--strategy", default="ddp", help="ddp, fsdp (FULL_SHARD), fsdp-shard-grad-op, fsdp-hybrid, "
                        "zero2, zero3 / deepspeed (default ddp)")
    parser.add_argument("--cpu-offload", action="store_true", help="offload sharded state to host RAM (fsdp / zero)")
    parser.add_argument("--optimizer", default="adamw", help="adamw, adamw_8bit, paged_adamw_8bit, adafactor, sgd")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on GPUs, fp16 on t4, fp32 on cpu), fp32, bf16, fp16")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--attention", default="sdpa", help="sdpa, flash_attention_2 or eager (default sdpa)")
    parser.add_argument("--quantization", default="none", help="base quantization for lora: none or int8 (qlora is nf4)")
    parser.add_argument("--lora-rank", default="16", help="LoRA rank (default 16)")
    parser.add_argument("--lora-targets", default="all-linear", help="all-linear or comma-separated names: "
                        + ",".join(LINEAR_NAMES))
    parser.add_argument("--loss-fraction", default="1.0", help="fraction of positions that carry loss (default 1.0)")
    parser.add_argument("--tokens", help="tokens to train on (e.g. 2e9, 500M), for GPU-hours")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=cmd_plan)


def _positive_int(name: str, text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise PlannerError(f"--{name}: expected a positive integer, found {text!r}")
    return int(text)


def _tokens(text: str | None) -> int | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not match or float(match.group(1)) * _SUFFIXES.get(match.group(2), 1) < 1:
        raise PlannerError(f"--tokens: expected a positive token count like 2e9 or 500M, found {text!r}")
    return int(float(match.group(1)) * _SUFFIXES.get(match.group(2), 1))


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PlannerError(f"--loss-fraction: expected a number in (0, 1], found {text!r}") from None


def setup_from_args(args: argparse.Namespace) -> TrainingSetup:
    precision = args.precision
    if precision == "auto":
        precision = "fp32" if args.gpu == "cpu" else ("fp16" if args.gpu == "t4" else "bf16")
    targets = LINEAR_NAMES if args.lora_targets == "all-linear" else tuple(
        name.strip() for name in args.lora_targets.split(",") if name.strip())
    return TrainingSetup(
        method=args.method,
        gpu="h100-80gb" if args.gpu == "any" else args.gpu,
        num_gpus=_positive_int("gpus", args.gpus),
        num_nodes=_positive_int("nodes", args.nodes),
        strategy=args.strategy,
        cpu_offload=args.cpu_offload,
        optimizer=args.optimizer,
        precision=precision,
        seq_len=_positive_int("seq-len", args.seq_len),
        micro_batch=_positive_int("batch", args.batch),
        grad_accum=_positive_int("grad-accum", args.grad_accum),
        gradient_checkpointing=args.gradient_checkpointing,
        attention=args.attention,
        quantization="nf4" if args.method == "qlora" and args.quantization == "none" else args.quantization,
        lora_rank=_positive_int("lora-rank", args.lora_rank),
        lora_targets=targets,
        loss_fraction=_fraction(args.loss_fraction),
    )


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        arch = load_model_arch(args.model)
        if args.gpu not in ("any", "cpu"):
            from tuneforge.planner.hardware import device

            device(args.gpu)  # names the valid GPU types before anything else is checked
        setup = setup_from_args(args)
        tokens = _tokens(args.tokens)
        result = plan_any_gpu(arch, setup, tokens=tokens) if args.gpu == "any" else plan(arch, setup, tokens=tokens)
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result))
    return EXIT_OK


def render(result: Plan) -> str:
    """The plan as a short report: breakdown table, verdict, recommendations, throughput."""
    m, s, arch = result.memory, result.setup, result.model
    lines = [
        f"{arch.name}: {format_params(arch.num_params)} parameters"
        + (f" ({format_params(arch.active_params)} active per token)" if arch.num_experts > 1 else "")
        + f", {format_params(m.trainable_params)} trainable",
        f"setup: {s.describe()}",
        "",
        f"{'per device':<34}{'GiB':>9}",
    ]
    for name, value in m.rows():
        note = ""
        if name == "activations":
            note = (f"   without checkpointing {m.activations_without_checkpointing / GiB:.2f}, "
                    f"with {m.activations_with_checkpointing / GiB:.2f}")
        lines.append(f"  {name:<32}{value / GiB:>9.2f}{note}")
    lines.append(f"  {'peak allocated':<32}{m.peak_allocated / GiB:>9.2f}   (gradients fill in as activations are freed)")
    if m.overhead:
        lines.append(f"  {'CUDA context, NCCL, fragmentation':<32}{m.overhead / GiB:>9.2f}")
    lines.append(f"  {'total':<32}{m.total / GiB:>9.2f}   of {result.capacity_bytes / GiB:.2f} "
                 f"({m.total / result.capacity_bytes:.0%})")
    if m.host_offload:
        lines.append(f"  {'host RAM per rank (offload)':<32}{m.host_offload / GiB:>9.2f}")
    lines += ["", *textwrap.wrap(f"verdict: {result.reason}", width=100)]
    if result.recommendations:
        lines += ["", "recommendations:" if not result.fits else "also:"]
        lines += [f"  - {tip}" for tip in result.recommendations]
    t = result.throughput
    lines.append("")
    flops = f"{t.model_flops_per_token / 1e9:.2f} GFLOP per token"
    if t.tokens_per_second_per_gpu is None:
        lines.append(f"throughput: {flops}; no estimate for {s.gpu} (no published peak FLOP/s)")
    else:
        lines.append(f"throughput: ~{t.tokens_per_second_per_gpu:,.0f} tokens/s per GPU at {t.mfu:.0%} MFU, "
                     f"~{t.tokens_per_second:,.0f} tokens/s on {s.world_size} GPU(s) ({flops})")
        if t.gpu_hours is not None:
            lines.append(f"  {t.tokens:,} tokens: ~{t.gpu_hours:,.1f} GPU-hours "
                         f"(~{t.gpu_hours / s.world_size:,.1f} h wall-clock)")
    return "\n".join(lines)
