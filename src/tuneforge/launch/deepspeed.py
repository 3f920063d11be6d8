"""DeepSpeed ZeRO configuration from a job spec, checks of a user's own DeepSpeed config, and whether
DeepSpeed is installed at all (an optional extra: `pip install 'tuneforge[deepspeed]'`).

A user's config arrives by content (`resources.deepspeed_config` is a JSON object; the job-file loader
reads a path once, on the user's machine), and any key that could make a worker write or read a path of
the job's choosing (profiler and monitor outputs, NVMe offload paths) or load code is refused.

Torch-free, so the CLI and the API can reject a deepspeed job at submission instead of mid-run (the API
checks structure only; DeepSpeed's own config classes import torch and run in the CLI and the recipe). The
generated config leaves the optimizer and the learning-rate schedule to tuneforge (it passes its own
to deepspeed.initialize), so a ZeRO run trains with exactly the spec's optimizer, schedule and loss
normalization; DeepSpeed shards them and clips the gradient norm.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

from tuneforge.spec.loader import SpecError

INSTALL_HINT = "pip install 'tuneforge[deepspeed]' on every machine that trains (or choose resources.strategy fsdp)"
# Keys a config may set that tuneforge does not override; anything else at the top level is a typo.
# Monitors (tensorboard, wandb, csv_monitor, comet), autotuning, nebula, elasticity and data_efficiency are
# absent on purpose: each writes to, reads from or uploads to a place the job would choose.
KNOWN_TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler", "comms_logger", "memory_breakdown",
    "data_types", "checkpoint", "seq_parallel_communication_data_type",
}
# Any key, at any depth, whose name says it holds a location or a command (flops_profiler.output_file,
# offload_param.nvme_path, ...): tuneforge keeps every output of a job in its job directory.
PATH_WORDS = {"path", "paths", "file", "files", "filename", "dir", "dirs", "directory", "folder", "command", "cmd",
              "script", "url", "uri", "host", "endpoint"}
MAX_DEPTH = 8


class DeepSpeedConfigError(SpecError):
    """A DeepSpeed config that cannot run this job; the message names the key and what was expected."""


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def generated_config(spec) -> dict[str, Any]:
    """ZeRO-2/3 for the spec's batch sizes, precision and clipping; optional CPU offload."""
    r, t = spec.resources, spec.training
    zero: dict[str, Any] = {"stage": r.deepspeed_stage, "overlap_comm": True, "contiguous_gradients": True}
    if r.deepspeed_stage == 3:
        # The final model is gathered whole on rank 0 when it is saved.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    force_ds_optimizer = {}
    if r.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # Our optimizer steps the offloaded fp32 partitions on the CPU (DeepSpeed would otherwise insist
        # on its own DeepSpeedCPUAdam, a C++ extension built on first use, and other update rules).
        force_ds_optimizer = {"zero_force_ds_cpu_optimizer": False}
        if r.deepspeed_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # tuneforge's own optimizer (spec.training.optimizer) runs under ZeRO.
        "zero_allow_untested_optimizer": True,
        **force_ds_optimizer,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


SOURCE = "resources.deepspeed_config"


def refuse_locations(config: dict[str, Any]) -> None:
    """Refuse keys that name a file, directory or command, unknown top-level sections, NVMe offload
    (it needs a path), and configs nested deeper than any DeepSpeed section."""
    unknown = sorted(set(config) - KNOWN_TOP_LEVEL)
    if unknown:
        raise DeepSpeedConfigError(f"{SOURCE}: unknown or unsupported key(s) {', '.join(unknown)}; "
                                   f"tuneforge accepts {', '.join(sorted(KNOWN_TOP_LEVEL))}")

    def walk(node: Any, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise DeepSpeedConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}"
                if PATH_WORDS & set(str(key).lower().replace("-", "_").split("_")):
                    raise DeepSpeedConfigError(
                        f"{path}: names a file, directory or command, which a job spec may not; tuneforge keeps "
                        "every output of a job in its job directory: remove it")
                if str(key) == "device" and value == "nvme":
                    raise DeepSpeedConfigError(f"{path}: NVMe offload needs a path on the worker, which a job "
                                               "spec may not name; use \"cpu\" or \"none\"")
                walk(value, path, depth + 1)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]", depth + 1)

    walk(config, SOURCE, 0)


def config_for(spec) -> dict[str, Any]:
    """The DeepSpeed config a job runs with: the user's own (its "auto" values filled from the spec, as
    the Hugging Face Trainer does), or the generated one. Raises DeepSpeedConfigError."""
    generated = generated_config(spec)
    config = spec.resources.deepspeed_config
    if config is None:
        return generated
    refuse_locations(config)
    if "optimizer" in config or "scheduler" in config:
        raise DeepSpeedConfigError(
            f"{SOURCE}: remove 'optimizer' and 'scheduler'; tuneforge runs "
            "training.optimizer with its learning-rate schedule under ZeRO")
    merged = copy.deepcopy(config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        value = merged.get(key, "auto")
        if value == "auto":
            merged[key] = generated[key]
        elif value != generated[key]:
            raise DeepSpeedConfigError(
                f"{SOURCE}: {key} is {value} but the job spec gives {generated[key]}; "
                "set it to \"auto\" (or leave it out) so the spec decides")
    for key in ("bf16", "fp16"):
        section = merged.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = generated[key]["enabled"]
    merged.setdefault("zero_allow_untested_optimizer", True)
    offload = ((merged.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if offload != "none":
        merged.setdefault("zero_force_ds_cpu_optimizer", False)  # tuneforge's optimizer, as in generated_config
    return merged


def check_config(config: dict[str, Any], *, world_size: int, source: str = "the generated DeepSpeed config",
                 deepspeed_classes: bool = True) -> None:
    """Batch arithmetic here, every section's keys and values by DeepSpeed's own config classes when
    DeepSpeed is installed and `deepspeed_classes` (they need no process group, but import torch)."""
    batch, micro, accumulation = (config.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                          "gradient_accumulation_steps"))
    if batch != micro * accumulation * world_size:
        raise DeepSpeedConfigError(f"{source}: train_batch_size {batch} must equal train_micro_batch_size_per_gpu "
                                   f"x gradient_accumulation_steps x processes = {micro} x {accumulation} x {world_size}")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (2, 3):
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage {stage!r}: tuneforge runs ZeRO stage 2 or 3")
    if not deepspeed_classes or not deepspeed_installed():
        return
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed checks the batch against its own world size (1 without a process group): ours is checked above.
    probe = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:  # pydantic.ValidationError, AssertionError, ValueError, TypeError
        detail = " ".join(str(exc).split())
        raise DeepSpeedConfigError(f"{source}: {detail[:600]}") from None


def config_source(spec) -> str:
    return SOURCE if spec.resources.deepspeed_config is not None else "the DeepSpeed config generated from the job spec"


def deepspeed_problem(spec, *, deepspeed_classes: bool = True) -> str | None:
    """Why a deepspeed job cannot start here, or None (also None for other strategies). The API passes
    deepspeed_classes=False: it checks structure and locations without importing torch, and leaves whether
    DeepSpeed is installed to the workers, which report it (launch/capabilities.py)."""
    r = spec.resources
    if r.strategy != "deepspeed":
        return None
    if deepspeed_classes and not deepspeed_installed():
        return f"resources.strategy deepspeed needs DeepSpeed, which is not installed: {INSTALL_HINT}"
    try:
        if any(v == "auto" for v in (spec.training.batch_size, spec.training.per_device_batch_size,
                                     spec.training.gradient_accumulation_steps)):
            # Sizes are resolved from the data when the job starts (the recipe checks the whole config then);
            # what the config may name is checked now.
            if r.deepspeed_config is not None:
                refuse_locations(r.deepspeed_config)
            return None
        check_config(config_for(spec), world_size=r.num_gpus * r.num_nodes, source=config_source(spec),
                     deepspeed_classes=deepspeed_classes)  # config_for refuses locations itself
    except DeepSpeedConfigError as exc:
        return str(exc)
    return None
