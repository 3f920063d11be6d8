"""Exports of a trained tiny LLaVA in the layouts vLLM loads: an adapter whose projector trained whole breaks vLLM's
LoRA rules (modules_to_save) and falls back to the merged model, a LlavaForConditionalGeneration directory with its
processor that transformers reloads and that answers the held-out image questions exactly as the adapter does; a
language-model-only adapter exports as a LoRA; LoRA on the vision tower and GGUF are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_job_dir
from tuneforge.export import ExportError, ServerRulesError, export_model
from tuneforge.recipes import vlm
from tuneforge.spec.jobdir import read_summary


def _job(tmp_path, model_dir, shapes, name, *, steps, vision=None, deploy=None):
    job_dir = make_job_dir(
        tmp_path / name, model_dir, method="vlm",
        dataset={"path": str(shapes / "chat.train.jsonl"), "validation_path": str(shapes / "chat.val.jsonl"),
                 "max_seq_length": 256},
        adapter={"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        training={"learning_rate": 1e-2, "batch_size": 8, "per_device_batch_size": 8, "max_steps": steps, "seed": 0},
        evaluation={"metrics": ["loss"], "eval_before_training": False, "max_eval_examples": 8},
        vision=vision or {}, deploy=deploy or {})
    vlm.run(job_dir, progress=False)
    return job_dir


def _answers(model, processor, shapes):
    from tuneforge.data.loading import load_examples
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.vision.data import VisionChatTokenizer
    from tuneforge.evaluation.vision import vlm_answers

    tokenizer = VisionChatTokenizer(processor, processor.image_token_id, shapes)
    examples = load_examples(shapes / "chat.val.jsonl")[0][:8]
    return vlm_answers(model, tokenizer, examples, max_new_tokens=6, batch_size=4,
                       precision=resolve_precision("fp32", torch.device("cpu")))[1]


def test_a_trained_projector_exports_merged_and_answers_as_the_adapter(tmp_path, tiny_llava_dir, shapes_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tuneforge.engine.vision.models import load_processor

    job_dir = _job(tmp_path, tiny_llava_dir, shapes_dir, "projector", steps=30)
    with pytest.raises(ServerRulesError, match="modules_to_save"):
        export_model(job_dir, format="adapter", target="vllm", out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    result = export_model(job_dir, format="adapter", target="vllm", fallback="merged", out=tmp_path / "export")
    model_dir = result.path / "model"
    assert result.format == "merged" and result.descriptor["fallback_from"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    for name in ("model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    merge = result.descriptor["checks"]["merge"]
    assert merge["max_abs_diff"] <= merge["tolerance"] and merge["adapter_effect"] > 100 * merge["tolerance"]

    merged = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    assert processor.image_token == "<image>" and processor.chat_template
    processor.tokenizer.padding_side = "right"
    adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32),
                                        job_dir / "adapter").eval()
    served = _answers(merged, processor, shapes_dir)
    assert served == _answers(adapter, load_processor(job_dir / "adapter"), shapes_dir)
    assert served != _answers(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32),
                              load_processor(tiny_llava_dir), shapes_dir)  # the merge carries what training changed


def test_language_model_only_adapters_export_as_lora_and_the_rest_is_refused(tmp_path, tiny_llava_dir, shapes_dir):
    plain = _job(tmp_path, tiny_llava_dir, shapes_dir, "plain", steps=2, vision={"projector": "frozen"},
                 deploy={"target": "vllm"})
    deployment = read_summary(plain).deployment  # deploy: in the spec ran the same export after training
    assert deployment.status == "succeeded" and deployment.format == "adapter", deployment
    assert "--enable-lora" in deployment.command
    result = export_model(plain, format="adapter", target="vllm", out=tmp_path / "lora")
    assert result.format == "adapter" and (result.path / "adapter" / "adapter_model.safetensors").is_file()
    assert result.descriptor["model_path"] == str(tiny_llava_dir.resolve())

    tower = _job(tmp_path, tiny_llava_dir, shapes_dir, "tower", steps=2,
                 vision={"vision_tower": "trained", "projector": "frozen"})
    with pytest.raises(ServerRulesError, match="vision_lora: LoRA weights on model.vision_tower"):
        export_model(tower, format="adapter", target="vllm", out=tmp_path / "tower-lora")
    with pytest.raises(ExportError, match="mmproj"):
        export_model(plain, format="gguf", target="llama.cpp", out=tmp_path / "gguf")
