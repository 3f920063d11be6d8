"""Exports of a real fine-tuning job on the tiny model: deploy: in the spec, merged (logits checked), adapter and
GGUF F16 / Q8_0 (read back with transformers), each generating with the chat template and stopping at EOS where
the fine-tuned PEFT model stops."""

import json
import shlex

import pytest
import torch

from conftest import chat, make_job_dir, write_jsonl
from tuneforge.engine.events import read_events
from tuneforge.export import ExportError, export_model
from tuneforge.export.bundle import GGUF_TOLERANCE
from tuneforge.export.merge import MERGE_TOLERANCE, MergeMismatch, check_prompts, prompt_logits
from tuneforge.recipes import sft
from tuneforge.spec.jobdir import read_summary

NAMES = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ida", "Jo", "Kai", "Lu"]
ASK = [{"role": "user", "content": "Say hi to Zed."}]
MAX_NEW = 24


def train_to_stop(model_dir, steps=60):
    """Teach the tiny base a short reply and its end-of-turn token (a plain loop: the base needs to stop so the
    adapter's and the exports' stopping points can be compared)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Say hi to {n}."},
                                            {"role": "assistant", "content": f"Hi {n}!"}], tokenize=False) for n in NAMES]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two that fight over busy shared cores (27 s vs 1 s)
    try:
        for _ in range(steps):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir)


def stopper_base(tmp_path_factory):
    """The tiny model taught to stop (train_to_stop), built once per session (the playground tests use it too)."""
    from tuneforge.engine.tiny_model import build_tiny_model_dir

    base = tmp_path_factory.getbasetemp() / "stopper-base"
    if not (base / "done").exists():
        build_tiny_model_dir(base)
        train_to_stop(base)
        (base / "done").touch()
    return base


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-job")
    base = stopper_base(tmp_path_factory)
    data = [chat(f"Say hi to {n}.", f"Hello, {n}.") for n in NAMES * 2]
    write_jsonl(root / "train.jsonl", data)
    write_jsonl(root / "val.jsonl", data[:4])
    job = make_job_dir(root, base, name="greeter",
                       dataset={"path": str(root / "train.jsonl"), "validation_path": str(root / "val.jsonl"),
                                "max_seq_length": 128},
                       training={"max_steps": 12, "learning_rate": 1e-2, "per_device_batch_size": 8},
                       evaluation={"metrics": ["loss"], "max_eval_examples": 4},
                       checkpoint={"every_steps": 100, "keep_last": 1}, deploy={"target": "vllm"})
    sft.run(job, progress=False)
    return job


def greedy(model, tokenizer):
    """The reply's token ids, generated with the model's own chat template until its EOS."""
    inputs = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def tuned(job_dir):
    """The fine-tuned PEFT model (the reference every export must reproduce), its tokenizer and its reply."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(json.loads((job_dir / "spec.json").read_text())["model"]["base_model"],
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, job_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(job_dir / "adapter")
    reply = greedy(model, tokenizer)
    assert reply[-1] == tokenizer.eos_token_id and len(reply) < MAX_NEW  # it stops, by itself
    return model, tokenizer, reply


def test_deploy_in_the_spec_exports_the_adapter_for_vllm(job_dir):
    summary = read_summary(job_dir)
    deployment = summary.deployment
    assert deployment.status == "succeeded" and deployment.format == "adapter" and deployment.path == "export"
    serve = json.loads((job_dir / "export" / "serve.json").read_text())
    argv = serve["argv"]["vllm"]
    assert argv[:3] == ["vllm", "serve", json.loads((job_dir / "spec.json").read_text())["model"]["base_model"]]
    command = shlex.join(argv)
    assert f"--enable-lora --lora-modules greeter={job_dir / 'export' / 'adapter'} --max-lora-rank 8" in command
    assert "--tensor-parallel-size 1" in command and deployment.command == serve["commands"]["vllm"]
    assert (job_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()
    for name in ("README.md", "ray_serve.yaml", "chat_template.jinja"):
        assert (job_dir / "export" / name).is_file()
    deploy_events = [e for e in read_events(job_dir) if e["data"].get("kind") == "deploy"]
    assert [e["data"]["status"] for e in deploy_events] == ["running", "succeeded"]
    assert deploy_events[-1]["data"]["path"] == "export"


def test_adapter_export_reloads_and_stops_where_the_fine_tuned_model_stops(job_dir, tuned):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, reply = tuned
    export = job_dir / "export"
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, export / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(export / "adapter")
    tokenizer.chat_template = (export / "chat_template.jinja").read_text()  # what the vLLM command passes
    assert greedy(model, tokenizer) == reply


def test_merged_export_equals_the_adapter_and_stops_at_eos(job_dir, tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, reply = tuned
    out = tmp_path / "merged"
    result = export_model(job_dir, format="merged", target="vllm", out=out)
    merge = result.descriptor["checks"]["merge"]
    assert merge["max_abs_diff"] <= merge["tolerance"] == MERGE_TOLERANCE * max(1.0, merge["scale"])
    assert merge["adapter_effect"] > 1000 * merge["max_abs_diff"]
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert merged_tokenizer.chat_template == tokenizer.chat_template and merged_tokenizer.eos_token == "<|im_end|>"
    prompts = check_prompts(tokenizer)
    for a, b in zip(prompt_logits(model, prompts), prompt_logits(merged, prompts)):
        torch.testing.assert_close(b, a, rtol=0, atol=MERGE_TOLERANCE * max(1.0, float(a.abs().max())))
    assert greedy(merged, merged_tokenizer) == reply
    assert merged.generation_config.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    vllm = result.descriptor["commands"]["vllm"]
    assert vllm.startswith(f"vllm serve {out / 'model'} --served-model-name greeter") and "--enable-lora" not in vllm


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_export_reads_back_with_transformers_and_stops_at_eos(job_dir, tuned, tmp_path, gguf_type):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, reply = tuned
    out = tmp_path / gguf_type
    result = export_model(job_dir, format="gguf", out=out, gguf_type=gguf_type)
    assert result.target == "llama.cpp"
    name = f"greeter-{gguf_type.upper()}.gguf"
    check = result.descriptor["checks"]["gguf"]
    assert check["max_abs_diff"] <= GGUF_TOLERANCE[gguf_type] * max(1.0, check["scale"])

    reader = gguf.GGUFReader(str(out / name))
    fields = reader.fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["general.architecture"].contents() == "llama"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper() and types["blk.0.attn_norm.weight"] == "F32"

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    prompts = check_prompts(tokenizer)
    for a, b in zip(prompt_logits(model, prompts), prompt_logits(loaded, prompts)):
        torch.testing.assert_close(b, a, rtol=0, atol=GGUF_TOLERANCE[gguf_type] * max(1.0, float(a.abs().max())))
    assert greedy(loaded, loaded_tokenizer) == reply
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert result.descriptor["argv"]["llama.cpp"][:3] == ["llama-server", "-m", str(out / name)]


def test_a_merge_whose_logits_differ_is_refused_and_writes_nothing(job_dir, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def off_by_a_little(self, *args, **kwargs):
        merged = real(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", off_by_a_little)
    with pytest.raises(MergeMismatch, match="changed the logits"):
        export_model(job_dir, format="merged", out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.staging*"))


def test_export_refuses_bad_requests_by_name(job_dir, tmp_path):
    with pytest.raises(ExportError, match="use --format gguf"):
        export_model(job_dir, format="merged", target="llama.cpp", out=tmp_path / "x")
    with pytest.raises(ExportError, match="not empty"):
        export_model(job_dir, format="adapter", out=job_dir)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "spec.json").write_text((job_dir / "spec.json").read_text())
    with pytest.raises(ExportError, match="has not succeeded"):
        export_model(unfinished, format="adapter", out=tmp_path / "y")


def test_the_cli_exports_and_prints_the_commands(job_dir, tmp_path, capsys):
    from tuneforge.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(job_dir), "--format", "adapter", "--target", "sglang", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adapter export for sglang" in printed and "--lora-paths greeter=" in printed
    assert main(["export", str(job_dir), "--format", "gguf", "--target", "vllm", "--out", str(tmp_path / "z")]) == 2
    assert "llama.cpp" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_qlora_adapters_merge_into_the_unquantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from tuneforge.engine.tiny_model import build_tiny_model_dir

    base = build_tiny_model_dir(tmp_path / "base")
    job = make_job_dir(tmp_path, base, adapter={"type": "qlora", "rank": 8, "alpha": 16, "dropout": 0.0,
                                                "target_modules": ["q_proj", "v_proj"]},
                       training={"max_steps": 2}, evaluation={"metrics": ["loss"], "max_eval_examples": 4})
    sft.run(job, progress=False)
    result = export_model(job, format="merged", out=tmp_path / "merged")
    assert "trained on: nf4" in result.descriptor["checks"]["merge"]["base"]
    merged = load_file(str(tmp_path / "merged" / "model" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    adapter = load_file(str(job / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (16 / 8) * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    assert delta.abs().max() > 0
    # Full precision: the float32 base weight plus the update, not a dequantized 4-bit weight.
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q], original[q] + delta, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
