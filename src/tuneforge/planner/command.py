"""`tuneforge plan`: the planner on the command line, as a table for people or JSON for machines.

It plans a JobSpec, read by the same loader as `tuneforge train` (a job file with dotted overrides); the
shortcut flags (--gpus, --batch, ...) are overrides of one spec field each, so both speak one vocabulary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.hardware import GiB
from tuneforge.planner.models import LINEAR_NAMES, PRESETS, format_params
from tuneforge.planner.plan import Plan

EXIT_OK, EXIT_BAD_INPUT = 0, 2
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


# Shortcut flags and the JobSpec fields they set: `tuneforge plan` speaks the job spec's vocabulary.
SHORTCUTS = {
    "model": "model.base_model", "method": "adapter.type", "gpus": "resources.num_gpus", "gpu": "resources.gpu_type",
    "nodes": "resources.num_nodes", "seq_len": "dataset.max_seq_length", "batch": "training.per_device_batch_size",
    "grad_accum": "training.gradient_accumulation_steps", "optimizer": "training.optimizer",
    "precision": "training.precision", "attention": "model.attn_implementation", "quantization": "model.quantization",
    "lora_rank": "adapter.rank", "lora_targets": "adapter.target_modules",
}
STRATEGIES = {
    "ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp", "fsdp_sharding": "full_shard"},
    "fsdp-shard-grad-op": {"strategy": "fsdp", "fsdp_sharding": "shard_grad_op"},
    "fsdp-hybrid": {"strategy": "fsdp", "fsdp_sharding": "hybrid_shard"},
    "zero2": {"strategy": "deepspeed", "deepspeed_stage": 2}, "zero3": {"strategy": "deepspeed", "deepspeed_stage": 3},
    "deepspeed": {"strategy": "deepspeed", "deepspeed_stage": 3},
}
# Without a job file, what the flags default to (a single A100 and a micro-batch of 4, LoRA at 2048 tokens).
FLAG_DEFAULTS = {"gpu": "a100-80gb", "batch": "4"}
INTEGER_FLAGS = ("gpus", "nodes", "seq_len", "batch", "grad_accum", "lora_rank")


def add_plan_command(commands) -> None:
    """Register `plan` on the tuneforge command's subparsers."""
    parser = commands.add_parser(
        "plan",
        help="estimate memory per GPU, whether a job fits, and its tokens/s and GPU-hours",
        description="Estimate a fine-tuning job's memory per GPU (weights, gradients, optimizer state, activations, "
        "buffers), say whether it fits, what to change if it does not, and how fast it will train. Plan a job file "
        "with dotted overrides, as `tuneforge train` reads it (tuneforge plan job.yaml resources.num_gpus=8), or "
        "describe the job with the shortcut flags, each of which sets one job-spec field. "
        "MODEL is a preset (" + ", ".join(PRESETS) + "), a config.json, or a local Hugging Face model directory.",
    )
    parser.add_argument("job", nargs="*", metavar="[JOB.yaml] [dotted.key=value ...]",
                        help="a job spec file and/or overrides such as training.per_device_batch_size=2")
    # Values are read as text and checked here, so bad input is one line and exit code 2.
    parser.add_argument("--model", help="model.base_model: preset name, config.json path or model directory")
    parser.add_argument("--method", help="adapter.type: lora, qlora or full (default lora)")
    parser.add_argument("--gpus", help="resources.num_gpus: GPUs per node (default 1)")
    parser.add_argument("--gpu", help="resources.gpu_type: a100-40gb, a100-80gb, h100-80gb, h200, b200, l4, a10g, t4, "
                        "any, or cpu (this machine's RAM); default a100-80gb without a job file")
    parser.add_argument("--nodes", help="resources.num_nodes (default 1)")
    parser.add_argument("--seq-len", help="dataset.max_seq_length (default 2048)")
    parser.add_argument("--batch", help="training.per_device_batch_size (default 4 without a job file)")
    parser.add_argument("--grad-accum", help="training.gradient_accumulation_steps (default 1)")
    parser.add_argument("--strategy", help="resources.strategy and its mode: " + ", ".join(STRATEGIES))
    parser.add_argument("--cpu-offload", action="store_true", help="resources.cpu_offload (fsdp / zero)")
    parser.add_argument("--optimizer", help="training.optimizer: adamw, adamw_8bit, paged_adamw_8bit, adafactor, sgd")
    parser.add_argument("--precision", help="training.precision: auto (bf16 on GPUs, fp16 on t4, fp32 on cpu), fp32, "
                        "bf16, fp16")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="training.gradient_checkpointing")
    parser.add_argument("--attention", help="model.attn_implementation: sdpa, flash_attention_2 or eager")
    parser.add_argument("--quantization", help="model.quantization for lora: none or int8 (qlora is nf4)")
    parser.add_argument("--lora-rank", help="adapter.rank (default 16)")
    parser.add_argument("--lora-targets", help="adapter.target_modules: all-linear or comma-separated names: "
                        + ",".join(LINEAR_NAMES))
    parser.add_argument("--tokens", help="tokens to train on, all epochs (e.g. 2e9, 500M), for GPU-hours and cost "
                        "(prices: TUNEFORGE_PRICE_TABLE or the defaults, docs/cost.md)")
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


def shortcut_overrides(args: argparse.Namespace, *, has_job_file: bool) -> dict[str, object]:
    """The job-spec fields the shortcut flags set, checked one flag at a time so an error names the flag."""
    given = {name: getattr(args, name) for name in SHORTCUTS if getattr(args, name) is not None}
    if not has_job_file:
        given = {**FLAG_DEFAULTS, **given}
    if "model" not in given and not has_job_file:
        raise PlannerError("--model: give a model (a preset, config.json or model directory) or a job file")
    if given.get("method", "lora") not in ("lora", "qlora", "full"):
        raise PlannerError(f"--method {given['method']!r}: expected lora, qlora or full")
    if given.get("gpu") not in (None, "any", "cpu"):
        from tuneforge.planner.hardware import device

        device(given["gpu"])  # names the valid GPU types
    fields: dict[str, object] = {}
    for name, value in given.items():
        if name in INTEGER_FLAGS:
            value = _positive_int(name.replace("_", "-"), value)
        elif name == "lora_targets":
            value = "all-linear" if value == "all-linear" else [t.strip() for t in value.split(",") if t.strip()]
        fields[SHORTCUTS[name]] = value
    if args.strategy is not None:
        if args.strategy not in STRATEGIES:
            raise PlannerError(f"--strategy {args.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        fields.update({f"resources.{key}": value for key, value in STRATEGIES[args.strategy].items()})
    if args.cpu_offload:
        fields["resources.cpu_offload"] = True
    if args.gradient_checkpointing:
        fields["training.gradient_checkpointing"] = True
    return fields


def job_spec_for(args: argparse.Namespace):
    """The JobSpec to plan: the job file (or a bare spec) with its overrides, then the shortcut flags."""
    from tuneforge.spec import SpecError, load_job_spec, validate_job_spec
    from tuneforge.spec.loader import apply_overrides

    positional = list(args.job)
    job_file = positional.pop(0) if positional and "=" not in positional[0] else None
    flags = shortcut_overrides(args, has_job_file=job_file is not None)
    overrides = positional + [f"{key}={json.dumps(value)}" for key, value in flags.items()]
    try:
        if job_file:
            return load_job_spec(job_file, overrides)
        # No data is read to plan: the dataset path is a placeholder the planner never opens.
        return validate_job_spec(apply_overrides({"dataset": {"path": "(planning only)"}}, overrides),
                                 source="tuneforge plan")
    except SpecError as exc:
        raise PlannerError(str(exc)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    from tuneforge.planner.plan import plan_job

    try:
        spec = job_spec_for(args)
        result = plan_job(spec, tokens=_tokens(args.tokens))
        estimate = plan_cost(result)
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps({**result.to_dict(), "cost": estimate.to_dict() if estimate else None}, indent=2))
    else:
        print(render(result) + (render_cost(estimate) if estimate else ""))
    return EXIT_OK


def plan_cost(result: Plan):
    """The cost of training --tokens on the plan's setup at the price table's rate (None without --tokens)."""
    from tuneforge.planner.cost import estimate_cost, price_table

    tokens = result.throughput.tokens
    if not tokens:
        return None
    return estimate_cost(result, tokens=tokens, rate=price_table().rate(result.setup.gpu), basis="--tokens")


def render_cost(estimate) -> str:
    if estimate.cost_usd is None:
        return f"\ncost: no estimate ({estimate.basis})"
    e = estimate
    return (f"\ncost: ~{e.gpu_hours:,.3g} {e.device} hours with start-up (~{e.wall_seconds / 3600:,.3g} h wall-clock), "
            f"~${e.cost_usd:,.3g} at ${e.price_per_gpu_hour:g}/h {e.market} (on-demand ~${e.on_demand_usd:,.3g}, "
            f"spot ~${e.spot_usd:,.3g})")


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
