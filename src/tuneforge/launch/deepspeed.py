"""DeepSpeed ZeRO configuration from a job spec, checks of a user's own DeepSpeed JSON, and whether
DeepSpeed is installed at all (an optional extra: `pip install 'tuneforge[deepspeed]'`).

Torch-free, so the CLI and the API can reject a deepspeed job at submission instead of mid-run. The
generated config leaves the optimizer and the learning-rate schedule to tuneforge (it passes its own
to deepspeed.initialize), so a ZeRO run trains with exactly the spec's optimizer, schedule and loss
normalization; DeepSpeed shards them and clips the gradient norm.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

from tuneforge.spec.loader import SpecError

INSTALL_HINT = "pip install 'tuneforge[deepspeed]' on every machine that trains (or choose resources.strategy fsdp)"
# Keys a config may set that tuneforge does not override; anything else at the top level is a typo.
KNOWN_TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler", "comms_logger", "memory_breakdown",
    "data_types", "checkpoint", "seq_parallel_communication_data_type", "torch_autocast",
}


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


def read_user_config(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DeepSpeedConfigError(f"resources.deepspeed_config {path}: cannot read it ({exc.strerror})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"resources.deepspeed_config {path}: line {exc.lineno} column {exc.colno}: "
                                   f"{exc.msg}; expected a JSON object") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"resources.deepspeed_config {path}: expected a JSON object, got {type(config).__name__}")
    return config


def config_for(spec) -> dict[str, Any]:
    """The DeepSpeed config a job runs with: the user's own (its "auto" values filled from the spec, as
    the Hugging Face Trainer does), or the generated one. Raises DeepSpeedConfigError."""
    generated = generated_config(spec)
    path = spec.resources.deepspeed_config
    if not path:
        return generated
    config = read_user_config(path)
    unknown = sorted(set(config) - KNOWN_TOP_LEVEL)
    if unknown:
        raise DeepSpeedConfigError(f"resources.deepspeed_config {path}: unknown key(s) {', '.join(unknown)}")
    if "optimizer" in config or "scheduler" in config:
        raise DeepSpeedConfigError(
            f"resources.deepspeed_config {path}: remove 'optimizer' and 'scheduler'; tuneforge runs "
            "training.optimizer with its learning-rate schedule under ZeRO")
    merged = copy.deepcopy(config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        value = merged.get(key, "auto")
        if value == "auto":
            merged[key] = generated[key]
        elif value != generated[key]:
            raise DeepSpeedConfigError(
                f"resources.deepspeed_config {path}: {key} is {value} but the job spec gives {generated[key]}; "
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


def check_config(config: dict[str, Any], *, world_size: int, source: str = "the generated DeepSpeed config") -> None:
    """Batch arithmetic here, every section's keys and values by DeepSpeed's own config classes when
    DeepSpeed is installed (they need no process group)."""
    batch, micro, accumulation = (config.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                          "gradient_accumulation_steps"))
    if batch != micro * accumulation * world_size:
        raise DeepSpeedConfigError(f"{source}: train_batch_size {batch} must equal train_micro_batch_size_per_gpu "
                                   f"x gradient_accumulation_steps x processes = {micro} x {accumulation} x {world_size}")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (2, 3):
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage {stage!r}: tuneforge runs ZeRO stage 2 or 3")
    if not deepspeed_installed():
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
    path = spec.resources.deepspeed_config
    return f"resources.deepspeed_config {path}" if path else "the DeepSpeed config generated from the job spec"


def deepspeed_problem(spec) -> str | None:
    """Why a deepspeed job cannot start here, or None (also None for other strategies)."""
    r = spec.resources
    if r.strategy != "deepspeed":
        return None
    if not deepspeed_installed():
        return f"resources.strategy deepspeed needs DeepSpeed, which is not installed: {INSTALL_HINT}"
    if r.deepspeed_config:
        try:
            read_user_config(r.deepspeed_config)
        except DeepSpeedConfigError as exc:
            return str(exc)
    if any(v == "auto" for v in (spec.training.batch_size, spec.training.per_device_batch_size,
                                 spec.training.gradient_accumulation_steps)):
        return None  # sizes are resolved from the data when the job starts; the recipe checks again then
    try:
        check_config(config_for(spec), world_size=r.num_gpus * r.num_nodes, source=config_source(spec))
    except DeepSpeedConfigError as exc:
        return str(exc)
    return None
