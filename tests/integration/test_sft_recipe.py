"""The SFT recipe end to end on a tiny Llama built from a config (CPU, seconds per run)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job_dir
from tuneforge.engine.events import read_events
from tuneforge.recipes import sft
from tuneforge.spec.jobdir import JobSummary, read_summary


def base_weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_lora_job_learns_and_writes_a_complete_job_directory(tmp_path, tiny_model_dir):
    job_dir = make_job_dir(tmp_path, tiny_model_dir, training={"max_steps": 25, "batch_size": 8})
    submitted = (job_dir / "spec.json").read_bytes()
    summary = sft.run(job_dir, progress=False)

    events = list(read_events(job_dir))
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == list(range(1, 26))
    for event in metrics:
        assert event["object"] == "fine_tuning.job.event" and event["level"] == "info"
        assert {"step", "train_loss", "learning_rate", "tokens_per_second"} <= set(event["data"])
    losses = [e["data"]["train_loss"] for e in metrics]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # the loss goes down

    assert summary.eval.fine_tuned.loss < summary.eval.base.loss
    assert JobSummary.model_validate_json((job_dir / "summary.json").read_text()) == summary  # the typed summary
    assert read_summary(job_dir) == summary
    assert summary.tokens_seen > 0 and summary.steps == 25
    kinds = [e["data"].get("kind") for e in events if e["type"] == "message"]
    assert kinds[0] == "status" and kinds[-1] == "status" and "checkpoint" in kinds and "eval" in kinds
    checkpoints = sorted(p.name for p in (job_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-000020", "step-000025"]  # keep_last=2
    # spec.json is the submitted spec, untouched; what the run resolved is in resolved_spec.json.
    assert (job_dir / "spec.json").read_bytes() == submitted
    assert json.loads(submitted)["training"]["num_epochs"] == "auto"
    resolved = json.loads((job_dir / "resolved_spec.json").read_text())
    assert resolved["training"]["max_steps"] == 25 and resolved["training"]["batch_size"] == 8
    assert resolved["training"]["precision"] == "fp32" and resolved["training"]["packing"] in (True, False)
    assert resolved["dataset"]["format"] == "chat" and resolved["dataset"]["prompt_template"] == "chat"
    assert "auto" not in {resolved["training"][k] for k in ("learning_rate", "num_epochs", "batch_size",
                                                            "per_device_batch_size", "gradient_accumulation_steps")}


def test_lora_changes_only_the_adapter_and_reloads_to_identical_logits(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = base_weights(tiny_model_dir)
    job_dir = make_job_dir(tmp_path, tiny_model_dir, training={"max_steps": 6}, evaluation={"metrics": ["loss"]})
    sft.run(job_dir, progress=False)

    adapter = load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero, so training moved it
    assert all(torch.equal(before[k], v) for k, v in base_weights(tiny_model_dir).items())  # base untouched

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, job_dir / "adapter").eval()
    input_ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        with_adapter = reloaded(input_ids=input_ids).logits
        with reloaded.disable_adapter():
            without = reloaded(input_ids=input_ids).logits
    assert not torch.allclose(with_adapter, without)
    # A second load gives bit-identical logits: the saved adapter is the whole trained state.
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      job_dir / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=input_ids).logits, with_adapter)


def test_full_fine_tuning_updates_base_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    job_dir = make_job_dir(tmp_path, tiny_model_dir, adapter={"type": "full"},
                           training={"max_steps": 4, "learning_rate": 1e-3}, evaluation={"metrics": ["loss"]})
    summary = sft.run(job_dir, progress=False)
    tuned_model = AutoModelForCausalLM.from_pretrained(job_dir / "model")
    assert summary.output == "model"
    assert summary.trainable_parameters == sum(p.numel() for p in tuned_model.parameters())  # every weight
    tuned = tuned_model.state_dict()
    before = base_weights(tiny_model_dir)
    assert not torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert summary.eval.fine_tuned.loss < summary.eval.base.loss


def test_qlora_runs_on_a_4bit_base(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    job_dir = make_job_dir(tmp_path, tiny_model_dir, adapter={"type": "qlora"}, training={"max_steps": 4},
                           evaluation={"metrics": ["loss"]})
    summary = sft.run(job_dir, progress=False)
    spec = json.loads((job_dir / "spec.json").read_text())
    assert spec["model"]["quantization"] == "nf4"
    assert summary.steps == 4 and (job_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert all(e["data"]["train_loss"] == e["data"]["train_loss"] for e in read_events(job_dir) if e["type"] == "metrics")


def test_exact_match_generation_metric(tmp_path, tiny_model_dir):
    job_dir = make_job_dir(tmp_path, tiny_model_dir, training={"max_steps": 2},
                           evaluation={"metrics": ["exact_match"], "max_eval_examples": 4, "max_new_tokens": 8})
    summary = sft.run(job_dir, progress=False)
    tuned = summary.eval.fine_tuned
    assert tuned.exact_match == 0.0 and len(tuned.samples) == 3  # an untrained tiny model gets nothing right
    assert all(sample.reference.startswith('{"name"') for sample in tuned.samples)
