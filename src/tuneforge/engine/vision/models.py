"""Vision models as a job spec asks for them: loaded with their processor, split into their parts (vision
tower, projector, language model), and made trainable (LoRA on the language model, the vision tower frozen or
adapted, the projector trained whole as PEFT's modules_to_save; or full fine-tuning of the parts that train).

The parts are named per architecture (a closed table), so a model type this table does not know is refused
with the list of those it does, instead of training the wrong modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tuneforge.engine.precision import Precision
from tuneforge.spec.job import JobSpec
from tuneforge.spec.loader import SpecError


@dataclass(frozen=True)
class VisionParts:
    """Where a VLM's parts live, as module paths inside its ForConditionalGeneration class."""

    vision_tower: str
    projector: str
    language_model: str


# transformers 5 layouts: the ForConditionalGeneration holds `model` (vision + projector + language model) and lm_head.
# llava and idefics3 (SmolVLM-256M/500M/2B) are trained in the tests; smolvlm (SmolVLM2) has idefics3's layout.
VLM_PARTS = {
    "llava": VisionParts("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "idefics3": VisionParts("model.vision_model", "model.connector", "model.text_model"),
    "smolvlm": VisionParts("model.vision_model", "model.connector", "model.text_model"),
}
# CLIP's towers and the projections into the shared space (trained whole beside a LoRA adapter).
CLIP_TOWERS = ("text_model", "vision_model")
CLIP_PROJECTIONS = ("text_projection", "visual_projection")


def vision_parts(model: nn.Module) -> VisionParts:
    model_type = model.config.model_type
    parts = VLM_PARTS.get(model_type)
    if parts is None:
        raise SpecError(f"model.base_model is a {model_type} model; method vlm trains {', '.join(sorted(VLM_PARTS))} "
                        "vision-language models")
    return parts


def _weights_check(model_dir: Path) -> None:
    from tuneforge.engine.base_models import safetensors_model_dir

    safetensors_model_dir(Path(model_dir))  # never a pickle: refused by name before transformers opens the folder


def load_processor(model_dir: str | Path):
    """The model's processor (image processor + tokenizer + chat template); padding on the right for training."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return processor


def load_vlm(model_dir: str | Path, spec: JobSpec, precision: Precision) -> nn.Module:
    """The vision-language model on the training device: float32 master weights for what full fine-tuning
    trains, the compute dtype for a frozen base under an adapter (as engine/model_loading.py). With
    model.quantization (QLoRA) only the language model's linear layers are quantized by bitsandbytes: the vision
    tower, the projector and the LM head keep their weights (a quantized tower could not train its own LoRA as
    exactly, and its few parameters save little)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from tuneforge.engine.model_loading import (_keep_4bit_weights_trainable, attention_implementation,
                                                quantization_config)

    _weights_check(Path(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in VLM_PARTS:
        raise SpecError(f"model.base_model is a {config.model_type} model; method vlm trains "
                        f"{', '.join(sorted(VLM_PARTS))} vision-language models")
    dtype = torch.float32 if spec.adapter.type == "full" else precision.dtype
    kwargs = {}
    quantization = quantization_config(spec.model, precision.dtype)
    if quantization is not None:
        parts = VLM_PARTS[config.model_type]
        quantization.llm_int8_skip_modules = [parts.vision_tower, parts.projector, "lm_head"]
        kwargs = {"quantization_config": quantization, "device_map": {"": precision.device}}
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, use_safetensors=True, dtype=dtype,
        attn_implementation=attention_implementation(spec.model.attn_implementation, precision.device), **kwargs)
    if quantization is None:
        model.to(precision.device)
    elif precision.device.type == "cpu":
        _keep_4bit_weights_trainable(model)
    model.config.use_cache = False
    return model


def load_clip(model_dir: str | Path, spec: JobSpec, precision: Precision) -> nn.Module:
    from transformers import AutoConfig, CLIPModel

    _weights_check(Path(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "clip":
        raise SpecError(f"model.base_model is a {config.model_type} model; method clip trains clip models")
    dtype = torch.float32 if spec.adapter.type == "full" else precision.dtype
    model = CLIPModel.from_pretrained(model_dir, use_safetensors=True, dtype=dtype)
    return model.to(precision.device)


def _linear_names(model: nn.Module, prefixes: list[str], wanted) -> list[str]:
    """Full names of the nn.Linear modules under prefixes whose own name is wanted (all-linear: every one)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(name.startswith(prefix + ".") for prefix in prefixes):
            continue
        if wanted == "all-linear" or name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    return names


def _peft(model: nn.Module, spec: JobSpec, targets: list[str], modules_to_save: list[str], task_type: str | None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if not targets:
        raise SpecError(f"adapter.target_modules {spec.adapter.target_modules}: no such linear layers in the parts "
                        "that train")
    adapter = spec.adapter
    model.requires_grad_(False)
    checkpointing = {"use_reentrant": False}
    if spec.model.quantization != "none":  # as text QLoRA (engine/adapters.py): float32 norms and embeddings
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=targets,
                        modules_to_save=modules_to_save or None, use_rslora=adapter.use_rslora,
                        use_dora=adapter.use_dora, bias="none", task_type=task_type)
    return get_peft_model(model, config)


def trainable_vlm(model: nn.Module, spec: JobSpec) -> nn.Module:
    """The VLM to train: LoRA on the language model (and the vision tower when vision.vision_tower is trained),
    the projector whole (modules_to_save) when vision.projector is trained; with adapter full, every weight of
    the parts that train."""
    parts, vision = vision_parts(model), spec.vision
    if spec.adapter.type == "full":
        model.requires_grad_(True)
        if vision.vision_tower == "frozen":
            model.get_submodule(parts.vision_tower).requires_grad_(False)
        if vision.projector == "frozen":
            model.get_submodule(parts.projector).requires_grad_(False)
        if spec.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    adapted = [parts.language_model] + ([parts.vision_tower] if vision.vision_tower == "trained" else [])
    targets = [name for name in _linear_names(model, adapted, spec.adapter.target_modules)
               if not name.startswith(parts.projector + ".")]
    projector = [parts.projector.rsplit(".", 1)[-1]] if vision.projector == "trained" else []
    return _peft(model, spec, targets, projector, "CAUSAL_LM")


def trainable_clip(model: nn.Module, spec: JobSpec) -> nn.Module:
    """The CLIP to train: LoRA on both towers with the projections trained whole (the temperature stays), or
    with adapter full every weight (the temperature too)."""
    if spec.adapter.type == "full":
        return model.requires_grad_(True)
    targets = _linear_names(model, list(CLIP_TOWERS), spec.adapter.target_modules)
    return _peft(model, spec, targets, list(CLIP_PROJECTIONS), None)


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def part_parameters(model: nn.Module, part: str) -> dict[str, torch.Tensor]:
    """Copies of the base weights of one part (PEFT's LoRA and saved-module copies excluded), by name: what a
    test compares before and after training to see which parts trained."""
    base = base_of(model)
    module = base.get_submodule(part)
    return {name: p.detach().clone() for name, p in module.named_parameters()
            if "lora_" not in name and "modules_to_save" not in name}
