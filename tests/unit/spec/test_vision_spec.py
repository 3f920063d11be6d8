"""Job specs of the vision methods: vlm trains on image chats and clip on image-text pairs, and what they cannot
do yet is refused at submission with the field and the reason (packing through images, truncation through image
tokens, quantized bases, sharded strategies, the vision section on another method)."""

from __future__ import annotations

import pytest

from tuneforge.spec import validate_job_spec
from tuneforge.spec.job import METHOD_FORMATS
from tuneforge.spec.jobdir import RECIPES
from tuneforge.spec.loader import SpecError


def spec(method: str = "vlm", **sections):
    model = {"base_model": {"vlm": "tiny-llava", "clip": "tiny-clip"}.get(method, "tiny-llama")}
    return validate_job_spec({"method": method, "model": model, "dataset": {"path": "d.jsonl"}, **sections})


def test_the_methods_their_formats_and_recipes():
    assert spec().vision.vision_tower == "frozen" and spec().vision.projector == "trained"
    assert spec(adapter={"type": "qlora"}).model.quantization == "nf4"  # QLoRA: the language model in 4 bits
    assert spec(vision={"vision_tower": "trained", "projector": "frozen"}).vision.vision_tower == "trained"
    assert METHOD_FORMATS["vlm"] == ("image_chat",) and METHOD_FORMATS["clip"] == ("image_text",)
    assert "image_chat" not in METHOD_FORMATS["sft"]
    assert RECIPES["vlm"] == "tuneforge.recipes.vlm" and RECIPES["clip"] == "tuneforge.recipes.clip"
    assert spec("clip").evaluation.metrics == ["loss", "perplexity"]


@pytest.mark.parametrize("method, sections, words", [
    ("vlm", {"training": {"packing": True}}, "training.packing: method vlm cannot pack"),
    ("clip", {"training": {"packing": True}}, "training.packing: method clip cannot pack"),
    ("vlm", {"dataset": {"path": "d.jsonl", "too_long": "truncate"}}, "cut through an example's image tokens"),
    ("clip", {"adapter": {"type": "qlora"}}, "quantized bases"),
    ("vlm", {"resources": {"num_gpus": 2, "strategy": "fsdp"}}, "resources.strategy fsdp"),
    ("sft", {"vision": {"vision_tower": "trained"}}, "vision applies to method vlm only"),
    ("vlm", {"dataset": {"path": "d.jsonl", "format": "chat"}}, "method vlm trains on image_chat records"),
    ("clip", {"evaluation": {"metrics": ["exact_match"]}}, "retrieval recall@1/5/10"),
    ("vlm", {"deploy": {"target": "llama.cpp"}}, "deploy.target llama.cpp: vision-language exports"),
    ("vlm", {"dataset": {"path": "d.jsonl", "prompt_template": "alpaca"}}, "processor's chat template"),
    ("sft", {"model": {"base_model": "tiny-llava"}}, "model.base_model tiny-llava trains with method vlm, not sft"),
    ("vlm", {"model": {"base_model": "tiny-llama"}}, "tiny-llama is a text model; method vlm needs"),
    ("clip", {"model": {"base_model": "tiny-llava"}}, "tiny-llava trains with method vlm, not clip"),
])
def test_what_cannot_run_is_refused_with_its_reason(method, sections, words):
    with pytest.raises(SpecError, match="invalid job spec") as error:
        spec(method, **sections)
    assert words in str(error.value)
