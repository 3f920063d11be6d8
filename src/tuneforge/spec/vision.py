"""Settings of the methods that see images, `vlm` (a vision-language model) and `clip`, and what they refuse.

A VLM is three parts: the vision tower (an image encoder), the projector (image features into the language
model's embeddings) and the language model. The adapter (LoRA, or full fine-tuning) applies to the language
model; this section says whether the vision tower and the projector train beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from tuneforge.spec.job import JobSpec


class VisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vision_tower: Literal["frozen", "trained"] = Field(
        "frozen", description="The image encoder: frozen (unchanged), or trained like the language model (its own "
        "LoRA with adapter lora, every weight with adapter full)."
    )
    projector: Literal["trained", "frozen"] = Field(
        "trained", description="The projector from image features into the language model: trained whole (PEFT's "
        "modules_to_save with an adapter, saved beside it) or frozen."
    )

    def is_default(self) -> bool:
        return self == VisionSpec()


# The built-in vision models (engine/vision/tiny.py) and the method each trains with; the other built-ins are text.
VISION_BASE_MODELS = {"tiny-llava": "vlm", "tiny-clip": "clip"}
TEXT_BASE_MODELS = ("smollm2-135m-instruct", "tiny-llama")


def base_model_problem(spec: JobSpec) -> str | None:
    """Why a built-in base model does not fit the method (a vision model for a text method, or the reverse)."""
    name, method = spec.model.base_model, spec.method
    wanted = VISION_BASE_MODELS.get(name)
    if wanted is not None and method not in (wanted, "export"):
        return f"model.base_model {name} trains with method {wanted}, not {method}"
    if method in VISION_BASE_MODELS.values() and name in TEXT_BASE_MODELS:
        choices = [n for n, m in VISION_BASE_MODELS.items() if m == method]
        return (f"model.base_model {name} is a text model; method {method} needs "
                f"{'a vision-language model' if method == 'vlm' else 'a CLIP model'}: {', '.join(choices)} or a local "
                f"{'LLaVA or Idefics3 (SmolVLM)' if method == 'vlm' else 'CLIP'} directory")
    return None


def vision_problem(spec: JobSpec) -> str | None:
    """Why a vlm or clip spec cannot run as written, or None."""
    method = spec.method
    if method == "clip" and (spec.adapter.type == "qlora" or spec.model.quantization != "none"):
        return ("method clip: quantized bases (adapter.type qlora, model.quantization) are not supported for CLIP "
                "models; use adapter lora or full with model.quantization none")
    if spec.training.packing is True:
        return (f"training.packing: method {method} cannot pack: a packed row would run one example's image tokens "
                "into another's and the rows would be cut through images; set it to auto or false")
    if spec.training.padding_free is True:
        return (f"training.padding_free: method {method} keeps one example per row (its image tokens and their "
                "positions); set it to auto or false")
    if method == "vlm" and spec.dataset.too_long == "truncate":
        return ("dataset.too_long truncate: method vlm would cut through an example's image tokens; use drop or "
                "error (and a larger dataset.max_seq_length)")
    if spec.resources.num_gpus * spec.resources.num_nodes > 1 and spec.resources.strategy != "ddp":
        return (f"resources.strategy {spec.resources.strategy}: method {method} trains with whole weights on every "
                "device; use ddp")
    if method == "vlm" and spec.dataset.prompt_template not in ("auto", "chat"):
        return (f"dataset.prompt_template {spec.dataset.prompt_template}: method vlm renders conversations with the "
                "processor's chat template; use auto or chat")
    if spec.checkpoint.output == "best":
        return f"checkpoint.output best: method {method} outputs the last step's weights; set it to last"
    evaluation = spec.evaluation
    if method == "vlm":
        if evaluation.graders:
            return "evaluation.graders: method vlm measures metrics (likelihood and generated), not graders yet"
        if "accuracy" in evaluation.metrics or "json_schema" in evaluation.metrics:
            return ("evaluation.metrics: method vlm measures loss, perplexity, token_accuracy and the generated "
                    "rouge1, rouge2, rougeL, bleu, chrf, exact_match, token_f1, json_valid")
    if method == "clip" and spec.deploy.target != "none":
        return "deploy: a CLIP model embeds images and text and is not served for generation; set deploy.target none"
    if spec.deploy.target not in ("none", "vllm"):
        return (f"deploy.target {spec.deploy.target}: vision-language exports are built and checked for vLLM's "
                "layout (the adapter on the language model, else the merged model with its processor); use vllm")
    return None
