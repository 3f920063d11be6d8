"""Exports of vision-language models (method vlm): the adapter where vLLM can serve it as a LoRA, else the merged
model in the layout vLLM loads for the architecture (its ForConditionalGeneration config, weights, processor).

vLLM's multimodal models apply a served LoRA to the language model (vllm/lora/model_manager.py skips the modules
outside `get_mm_mapping().language_model` unless the model opts in to tower / connector LoRA), and, as for text,
reject `modules_to_save` (vllm/lora/peft_helper.py). A VLM adapter whose projector trained whole, or whose vision
tower has its own LoRA, is therefore exported merged: PEFT merges the LoRA and swaps in the trained projector, the
merged logits on an image prompt must equal the adapter model's before anything is written, and the processor
(image processor, tokenizer, chat template) is saved beside the weights so the server renders images as training did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.export.merge import MERGE_TOLERANCE, merge_checked
from tuneforge.export.server_rules import RuleFailure

VLLM_LORA_SOURCE = "vLLM vllm/lora/model_manager.py: LoRA on the language model of a multimodal model"
CHECK_QUESTIONS = ("What colour is the shape?", "Describe the image.")
CHECK_TEXT = "Answer in one word."


def is_vision_model(model_dir: Path) -> bool:
    """Whether a Hugging Face directory holds a VLM the vlm method trains (its config names a vision tower)."""
    from tuneforge.engine.vision.models import VLM_PARTS

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return "vision_config" in config and config.get("model_type") in VLM_PARTS


def vision_adapter_failures(facts, base_dir: Path) -> list[RuleFailure]:
    """What a server cannot take in a VLM adapter beyond the text rules: LoRA outside the language model."""
    from tuneforge.engine.vision.models import VLM_PARTS

    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    parts = VLM_PARTS[config["model_type"]]
    outside = [part for part in (parts.vision_tower, parts.projector)
               if any(f"{part}." in name and ".lora_" in name for name in facts.tensors)]
    if not outside:
        return []
    return [RuleFailure("vision_lora", f"LoRA weights on {', '.join(outside)}: the server applies an adapter to the "
                        "language model only", VLLM_LORA_SOURCE)]


def check_image():
    """A fixed image for the logit check: a red square on grey, at whatever size the processor resizes it to."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=(220, 30, 30))
    return image


def check_inputs(processor) -> list[dict[str, torch.Tensor]]:
    """Model inputs of the check prompts: questions about the check image through the processor's chat template,
    and one text-only prompt."""
    inputs = []
    for question in CHECK_QUESTIONS:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs.append(dict(processor(text=[text], images=[check_image()], return_tensors="pt")))
    messages = [{"role": "user", "content": [{"type": "text", "text": CHECK_TEXT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs.append(dict(processor(text=[text], return_tensors="pt")))
    return inputs


@torch.no_grad()
def input_logits(model, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [model(**batch).logits.float() for batch in inputs]


def load_vision_base_fp32(base_dir: Path):
    """The VLM in float32 on the CPU, never quantized (as merge.load_base_fp32 for text)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).eval()


def merge_vision_adapter(adapter_dir: Path, base_dir: Path, *, tolerance: float = MERGE_TOLERANCE):
    """(merged float32 VLM, processor, LogitCheck): the LoRA merged and the trained projector in place. Raises
    MergeMismatch when the merged logits on the image prompts differ from the adapter model's."""
    from peft import PeftModel

    from tuneforge.engine.vision.models import load_processor

    processor = load_processor(adapter_dir if (adapter_dir / "processor_config.json").is_file() else base_dir)
    peft_model = PeftModel.from_pretrained(load_vision_base_fp32(base_dir), adapter_dir).eval()
    merged, check = merge_checked(peft_model, input_logits, check_inputs(processor), tolerance=tolerance,
                                  what=f"merging {adapter_dir} into {base_dir} changed the logits on image prompts")
    return merged, processor, check


def save_merged_vision(model, processor, target: Path, *, dtype: torch.dtype) -> None:
    """The merged VLM as its ForConditionalGeneration checkpoint plus the processor's files, checked to reload to
    the verified weights. transformers writes LLaVA-family checkpoints under their original key names
    (language_model.model.*, the names vLLM's loaders map from), so the check reloads through transformers
    instead of comparing key by key."""
    from tuneforge.export.source import ExportError

    model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(target)
    processor.save_pretrained(target)  # processor_config.json, the image processor, tokenizer and chat template
    expected = model.state_dict()
    reloaded = type(model).from_pretrained(target, dtype=dtype, use_safetensors=True).state_dict()
    wrong = sorted(set(expected) ^ set(reloaded)) + [k for k in expected if k in reloaded
                                                    and not torch.equal(expected[k], reloaded[k])]
    if wrong or not expected:
        raise ExportError(f"the merged model written to {target} does not reload to the verified weights ({wrong[:3]})")
