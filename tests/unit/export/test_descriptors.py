"""Serving descriptors: tensor-parallel size from model size and GPU memory, the server commands, Modelfile."""

import shlex

import pytest

from tuneforge.export.descriptors import ServeDescriptor, ollama_modelfile, parallelism, ray_serve_config
from tuneforge.spec.job import JobSpec

GiB = 1 << 30


@pytest.mark.parametrize(("params_b", "gpu", "heads", "tp", "pp"), [
    (0.135, "h100-80gb", 9, 1, 1),  # SmolLM2-135M
    (8, "h100-80gb", 32, 1, 1),  # Llama 3 8B bf16: 16 GB
    (8, "t4", 32, 2, 1),  # 16 GB on 15 GiB cards: under half of each needs 2
    (70, "h100-80gb", 64, 4, 1),  # 140 GB: 35 GB per GPU
    (70, "a100-40gb", 64, 8, 1),
    (405, "h100-80gb", 128, 8, 3),  # 810 GB: more than one node of 8
])
def test_tensor_parallel_size_from_model_size_and_gpu_memory(params_b, gpu, heads, tp, pp):
    p = parallelism(int(params_b * 1e9) * 2, num_heads=heads, gpu=gpu)
    assert (p.tensor_parallel_size, p.pipeline_parallel_size) == (tp, pp)


def test_tensor_parallel_size_divides_the_attention_heads():
    assert parallelism(int(70e9) * 2, num_heads=9, gpu="h100-80gb").tensor_parallel_size == 1  # 9 heads: only 1 divides


def test_the_vllm_command_serves_the_adapter_on_its_base():
    d = ServeDescriptor(format="adapter", target="vllm", name="support-bot", model_path="/models/base",
                        adapter_path="/exports/bot/adapter", max_lora_rank=16, dtype="bfloat16",
                        parallel=parallelism(140 * GiB, num_heads=64, gpu="h100-80gb"),
                        chat_template_path="/exports/bot/chat_template.jinja", eos_token="<|im_end|>")
    argv = d.commands()["vllm"]
    assert argv[:3] == ["vllm", "serve", "/models/base"]
    flags = shlex.join(argv)
    assert "--enable-lora --lora-modules support-bot=/exports/bot/adapter --max-lora-rank 16" in flags
    assert "--tensor-parallel-size 4" in flags and "--chat-template /exports/bot/chat_template.jinja" in flags
    assert "--lora-paths support-bot=/exports/bot/adapter" in shlex.join(d.commands()["sglang"])
    assert "--lora-adapters support-bot=/exports/bot/adapter" in shlex.join(d.commands()["tgi"])
    ray = ray_serve_config(d)
    assert "build_openai_app" in ray and "tensor_parallel_size: 4" in ray and "dynamic_lora_loading_path" in ray


def test_the_modelfile_keeps_a_chatml_template_and_stops_at_eos():
    d = ServeDescriptor(format="gguf", target="llama.cpp", name="bot", model_path="/e/bot-Q8_0.gguf", eos_token="<|im_end|>")
    text = ollama_modelfile(d, "bot-Q8_0.gguf", "{{ '<|im_start|>' + message['role'] }}")
    assert text.splitlines()[1] == "FROM ./bot-Q8_0.gguf"
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "TEMPLATE" not in ollama_modelfile(d, "bot-Q8_0.gguf", "[INST] {{ message }} [/INST]")  # left to the GGUF


def spec(**deploy):
    return {"dataset": {"path": "data.jsonl"}, "deploy": deploy}


def test_deploy_choices_are_checked_at_submission():
    assert JobSpec.model_validate(spec(target="vllm")).deploy.export_format(JobSpec.model_validate(spec()).adapter) == "adapter"
    assert JobSpec.model_validate(spec(target="llama.cpp")).deploy.format == "auto"
    for bad, message in [
        ({"target": "none", "merge_adapter": True}, "need a deploy.target"),
        ({"target": "vllm", "format": "gguf"}, "llama.cpp loads gguf"),
        ({"target": "llama.cpp", "format": "merged"}, "llama.cpp loads gguf"),
        ({"target": "vllm", "format": "adapter", "merge_adapter": True}, "contradicts"),
        ({"target": "playground"}, "target"),
        ({"target": "vllm", "gguf_type": "q8_0"}, "gguf_type applies to format gguf"),
        ({"target": "llama.cpp", "gpu_type": "h200"}, "llama.cpp takes none"),
        ({"target": "vllm", "format": "merged", "fallback": "merged"}, "fallback applies to adapter"),
    ]:
        with pytest.raises(ValueError, match=message):
            JobSpec.model_validate(spec(**bad))
    with pytest.raises(ValueError, match="DoRA"):
        JobSpec.model_validate({**spec(target="vllm"), "adapter": {"use_dora": True}})
    with pytest.raises(ValueError, match="up to 512"):
        JobSpec.model_validate({**spec(target="vllm"), "adapter": {"rank": 1024}})
    with pytest.raises(ValueError, match="no adapter"):
        JobSpec.model_validate({**spec(target="vllm", format="adapter"), "adapter": {"type": "full"}})
    assert JobSpec.model_validate({**spec(target="vllm", fallback="merged"), "adapter": {"use_dora": True}})
    # What spec.json holds validates again (every field written out).
    full = JobSpec.model_validate(spec(target="llama.cpp", gguf_type="q8_0"))
    assert JobSpec.model_validate_json(full.model_dump_json()) == full
