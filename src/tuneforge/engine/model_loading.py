"""Load a base model and its tokenizer the way a job spec asks: dtype, attention kernel, quantization."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tuneforge.engine.precision import Precision
from tuneforge.spec.job import ModelSpec


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        # Padding never carries loss (labels are masked by position, not by id), so EOS is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def attention_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quantization_config(spec: ModelSpec, compute_dtype: torch.dtype):
    """bitsandbytes settings for model.quantization, or None for full-precision weights."""
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if spec.compute_dtype != "auto":
        compute_dtype = getattr(torch, spec.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_use_double_quant=spec.double_quantization,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during an eval pass.

    bitsandbytes (0.50) repacks a Linear4bit's weight into an AVX512 layout the first time it runs in eval
    mode, and never packs it back; training afterwards goes through `gemv_4bit`, which has no autograd
    kernel, so the gradient flowing to earlier LoRA layers is silently wrong. Measured here: the
    evaluation before training triggered it. Repacking saves a little inference time; correctness wins.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def weights_dtype(precision: Precision, *, full_finetune: bool) -> torch.dtype:
    """The base's stored dtype: float32 master weights for full fine-tuning (autocast does the half-precision
    math), the compute dtype under an adapter (halving the frozen base's memory). Whole and sharded loads."""
    return torch.float32 if full_finetune else precision.dtype


def load_base_model(model_dir: str | Path, spec: ModelSpec, precision: Precision, *, full_finetune: bool):
    """The base model on the training device.

    Full fine-tuning keeps float32 master weights (autocast does the half-precision math); adapter
    training stores the frozen base in the compute dtype, halving its memory.
    """
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.base_models import safetensors_model_dir

    safetensors_model_dir(Path(model_dir))  # never a pickle: refused by name before transformers opens the folder
    quantization = quantization_config(spec, precision.dtype)
    kwargs = {
        "use_safetensors": True,
        "dtype": weights_dtype(precision, full_finetune=full_finetune),
        "attn_implementation": attention_implementation(spec.attn_implementation, precision.device),
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": precision.device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization is None:
        model.to(precision.device)
    elif precision.device.type == "cpu":
        _keep_4bit_weights_trainable(model)
    model.config.use_cache = False  # the KV cache only costs memory while training
    return model


# Model families whose attention takes a custom 4D mask on sdpa/eager and position ids on flash-attention:
# packed examples are verified isolated for these (tests/integration/test_packing_isolation.py on Llama).
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packed_row_cap(config) -> int | None:
    """The longest SDPA row worth packing for this model (spec/hyperparameters.py:sdpa_row_cap, from the
    planner's reading of its config); None for a config the planner cannot read, which packing_support
    refuses anyway."""
    from tuneforge.planner.models import PlannerError, arch_from_config

    try:
        return arch_from_config(config.to_dict(), config.model_type).packed_row_cap()
    except PlannerError:
        return None


def packing_support(config, attention: str, max_seq_length: int) -> tuple[bool, str]:
    """(can examples be packed with isolated attention for this model, why not)."""
    if config.model_type not in PACKING_MODEL_TYPES:
        return False, f"packing isolation is not verified for {config.model_type} models"
    if attention not in ("sdpa", "eager", "flash_attention_2"):
        return False, f"packing needs sdpa, eager or flash_attention_2 attention, not {attention}"
    window = getattr(config, "sliding_window", None)
    if window and max_seq_length > window and attention != "flash_attention_2":
        return False, f"rows longer than the {window}-token sliding window need flash-attention to stay isolated"
    return True, ""
