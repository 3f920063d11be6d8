"""Every training option of the job spec, exercised on the tiny model (a few CPU steps each)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job_dir
from tuneforge.engine.events import read_events
from tuneforge.recipes import sft

QUICK = {"evaluation": {"metrics": ["loss"], "max_eval_examples": 8}}


def train(tmp_path, model_dir, name="job", **sections):
    for key, value in QUICK.items():
        sections.setdefault(key, value)
    job_dir = make_job_dir(tmp_path / name, model_dir, **sections)
    summary = sft.run(job_dir, progress=False)
    losses = [e["data"]["train_loss"] for e in read_events(job_dir) if e["type"] == "metrics" and "train_loss" in e["data"]]
    return job_dir, summary, losses


def adapter_weights(job_dir):
    return load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))


def test_target_modules_by_name(tmp_path, tiny_model_dir):
    job_dir, _, _ = train(tmp_path, tiny_model_dir, adapter={"target_modules": ["q_proj", "v_proj"]},
                          training={"max_steps": 2})
    names = {key.split(".")[-3] for key in adapter_weights(job_dir)}
    assert names == {"q_proj", "v_proj"}
    config = json.loads((job_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 8


@pytest.mark.parametrize("variant", ["use_rslora", "use_dora"])
def test_rslora_and_dora(tmp_path, tiny_model_dir, variant):
    job_dir, summary, losses = train(tmp_path, tiny_model_dir, adapter={variant: True}, training={"max_steps": 10})
    config = json.loads((job_dir / "adapter" / "adapter_config.json").read_text())
    assert config[variant] is True
    if variant == "use_dora":
        assert any("lora_magnitude_vector" in key for key in adapter_weights(job_dir))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("quantization", "double"), [("nf4", True), ("fp4", False), ("int8", False)])
def test_quantized_bases_train_lora(tmp_path, tiny_model_dir, quantization, double):
    job_dir, summary, losses = train(
        tmp_path, tiny_model_dir, model={"quantization": quantization, "double_quantization": double,
                                         "compute_dtype": "float32"},
        training={"max_steps": 6, "learning_rate": 3e-3},
    )
    assert summary.steps == 6 and all(loss == loss for loss in losses)
    assert losses[-1] < losses[0]
    assert summary.trainable_parameters < 50_000  # only the adapter


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"])
def test_every_optimizer_updates_the_adapter(tmp_path, tiny_model_dir, optimizer):
    lr = {"sgd": 0.5, "adafactor": 3e-3}.get(optimizer, 3e-3)
    job_dir, _, losses = train(tmp_path, tiny_model_dir, training={"max_steps": 8, "optimizer": optimizer,
                                                                    "learning_rate": lr, "weight_decay": 0.01})
    lora_b = [v for k, v in adapter_weights(job_dir).items() if "lora_B" in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero; the optimizer moved it
    assert losses[-1] < losses[0]


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tiny_model_dir):
    _, _, large = train(tmp_path, tiny_model_dir, "large", training={"max_steps": 5, "batch_size": 8,
                                                                      "per_device_batch_size": 8})
    job_dir, _, accumulated = train(tmp_path, tiny_model_dir, "accumulated",
                                    training={"max_steps": 5, "batch_size": 8, "per_device_batch_size": 2})
    assert json.loads((job_dir / "resolved_spec.json").read_text())["training"]["gradient_accumulation_steps"] == 4
    assert large == pytest.approx(accumulated, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_model_dir):
    for adapter in ("lora", "full"):
        _, _, plain = train(tmp_path, tiny_model_dir, f"{adapter}-plain", adapter={"type": adapter},
                            training={"max_steps": 4, "learning_rate": 1e-3})
        _, _, checkpointed = train(tmp_path, tiny_model_dir, f"{adapter}-gc", adapter={"type": adapter},
                                   training={"max_steps": 4, "learning_rate": 1e-3, "gradient_checkpointing": True})
        assert plain == pytest.approx(checkpointed, rel=1e-5)


def test_gradient_clipping_bounds_the_update(tmp_path, tiny_model_dir):
    job_dir, _, _ = train(tmp_path, tiny_model_dir, "clipped",
                          training={"max_steps": 1, "warmup_ratio": 0.0, "optimizer": "sgd", "learning_rate": 1.0,
                                    "max_grad_norm": 1e-3})
    events = [e["data"] for e in read_events(job_dir) if e["type"] == "metrics" and "grad_norm" in e["data"]]
    assert events[0]["grad_norm"] > 1e-3  # the norm before clipping is reported
    update = torch.cat([v.flatten() for k, v in adapter_weights(job_dir).items() if "lora_B" in k])
    # SGD's first step moves by lr * clipped gradient: the norm of the whole update is at most 1e-3.
    assert 0 < update.norm() <= 1e-3 * 1.0001


def test_seeds_make_cpu_runs_bit_reproducible(tmp_path, tiny_model_dir):
    sections = {"adapter": {"dropout": 0.1}, "training": {"max_steps": 4, "seed": 3}}
    _, _, first = train(tmp_path, tiny_model_dir, "a", **sections)
    _, _, second = train(tmp_path, tiny_model_dir, "b", **sections)
    _, _, other = train(tmp_path, tiny_model_dir, "c", adapter={"dropout": 0.1}, training={"max_steps": 4, "seed": 4})
    assert first == second and first != other


def test_bf16_mixed_precision_on_cpu(tmp_path, tiny_model_dir):
    _, summary, losses = train(tmp_path, tiny_model_dir, training={"max_steps": 6, "precision": "bf16"})
    assert summary.precision == "bf16" and losses[-1] < losses[0]


def test_auto_hyperparameters_are_recorded_in_the_resolved_spec(tmp_path, tiny_model_dir):
    job_dir, summary, _ = train(tmp_path, tiny_model_dir, training={"max_steps": 2, "per_device_batch_size": "auto",
                                                                     "learning_rate": "auto"})
    assert json.loads((job_dir / "spec.json").read_text())["training"]["learning_rate"] == "auto"  # as submitted
    resolved = json.loads((job_dir / "resolved_spec.json").read_text())["training"]
    events = list(read_events(job_dir))
    plan = [e for e in events if e["data"].get("kind") == "plan"][0]["data"]
    examples = [e for e in events if e["data"].get("kind") == "dataset"][0]["data"]["train_examples"]
    # Packed (auto for Llama): the auto batch of 8 examples (320 of them) is the rows that hold 8 examples.
    assert resolved["packing"] is True and plan["packed_row_length"] <= 512
    rows = max(1, round(8 * plan["packed_rows"] / examples))
    assert resolved["learning_rate"] == 2e-4 and resolved["num_epochs"] == 3.0 and resolved["batch_size"] == rows
    assert resolved["per_device_batch_size"] == rows and resolved["gradient_accumulation_steps"] == 1
    assert plan["learning_rate"] == 2e-4 and plan["batch_size"] == rows


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_step(tmp_path, tiny_model_dir, monkeypatch):
    from tuneforge.engine import faults

    _, _, reference = train(tmp_path, tiny_model_dir, "reference",
                            training={"max_steps": 3, "batch_size": 8, "per_device_batch_size": 2})
    monkeypatch.setitem(faults.FAULTS, "oom_above_micro_batch", 2)
    job_dir, _, losses = train(tmp_path, tiny_model_dir, "oom", training={"max_steps": 3, "batch_size": 8,
                                                                           "per_device_batch_size": 8})
    backoffs = [e["data"]["per_device_batch_size"] for e in read_events(job_dir) if e["data"].get("kind") == "micro_batch"]
    assert backoffs == [4, 2]
    assert losses == reference  # the same examples per step, the same result


def test_auto_packing_stays_off_where_capped_rows_would_hold_one_long_example(tmp_path, tiny_model_dir):
    # ~330-byte chats on the byte-level tiny model: 4 of them would be a 1,300-token row, past the SDPA row
    # cap (512 here), and a 512-token row holds one of them: packing would only add the mask.
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Repeat number {i}: " + "lorem ipsum " * 12},
                                      {"role": "assistant", "content": "dolor sit amet " * 12}]}) for i in range(24)]
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    job_dir, _, losses = train(tmp_path, tiny_model_dir, dataset={"path": str(tmp_path / "long.jsonl")},
                               training={"max_steps": 2, "packing": "auto", "per_device_batch_size": 4})
    plan = [e for e in read_events(job_dir) if e["data"].get("kind") == "plan"][0]["data"]
    assert plan["packing"] is False and "would hold 1.0 examples each" in plan["packing_disabled_because"]
    assert json.loads((job_dir / "resolved_spec.json").read_text())["training"]["packing"] is False
    assert len(losses) == 2
