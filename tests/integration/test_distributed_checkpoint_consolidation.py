"""Checkpoints of real 2-process jobs (gloo on CPU) saved in parts, FSDP's torch.distributed.checkpoint shards and
DeepSpeed's ZeRO partitions, consolidate into the weights of the live model at that step, and a model assembled from
one for a job to train from loads them. The checkpoint at the last step is compared with the job's final weights,
which the runtime gathered from the live model after that step (test_distributed.py shows those equal the
single-process run's). The 2-process jobs are behind slow (20-40 s each): tests/unit/test_checkpoint_consolidation.py
is the default suite's check, on DCP checkpoints written in one process. The PPO test (one process: PPO trains
under DDP only, its checkpoints whole) runs by default."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import STEPS, job_with, run
from test_registry_db import db, make_job  # noqa: F401 - db is the fixture

from tuneforge.registry.checkpoints import assemble_checkpoint
from tuneforge.registry.consolidate import consolidate, saved_in_parts


def _assert_equal(ours: dict, theirs: dict, tolerance: float = 1e-6) -> None:
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.allclose(ours[name], tensor, atol=tolerance, rtol=0), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy,resources", [("fsdp", {}), ("deepspeed", {"deepspeed_stage": 2}),
                                                ("deepspeed", {"deepspeed_stage": 3})],
                         ids=["fsdp", "zero2", "zero3"])
def test_a_sharded_adapter_checkpoint_is_the_live_adapter_at_its_step(strategy, resources, tmp_path, tiny_model_dir,
                                                                      tuneforge_home):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job_dir = job_with(tmp_path, tiny_model_dir, strategy, processes=2, strategy=strategy, resources=resources)
    assert run(job_dir, tuneforge_home).status == "succeeded"
    checkpoint = job_dir / "checkpoints" / f"step-{STEPS:06d}"
    assert saved_in_parts(checkpoint) == ("fsdp" if strategy == "fsdp" else "deepspeed")
    assert not (checkpoint / "adapter_model.safetensors").exists()
    version = job_dir / "adapter"  # what the registry materializes of the job's version
    out = tmp_path / "consolidated.safetensors"
    consolidate(checkpoint, version, kind="adapter", out=out)
    final = load_file(version / "adapter_model.safetensors")
    _assert_equal(load_file(out), final)

    # A job training from it: the assembled adapter loads onto the base as those weights.
    assembled = assemble_checkpoint(version, checkpoint, tmp_path / "registry", kind="adapter", step=STEPS,
                                    label=f"checkpoint step {STEPS}")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       assembled)
    from peft import get_peft_model_state_dict

    _assert_equal(get_peft_model_state_dict(loaded), final)
    # An earlier kept step is another point of the same run: not the final weights.
    earlier = job_dir / "checkpoints" / f"step-{STEPS - 2:06d}"
    consolidate(earlier, version, kind="adapter", out=tmp_path / "earlier.safetensors")
    assert any((load_file(tmp_path / "earlier.safetensors")[name] - tensor).abs().max() > 1e-6
               for name, tensor in final.items())


@pytest.mark.slow
# ZeRO-3 full fine-tuning fails in its first step on this DeepSpeed (its lr scheduler sees fewer parameter groups
# than ours): not a checkpoint matter, ZeRO-3's partitions are consolidated in the adapter test above.
@pytest.mark.parametrize("strategy,resources", [("fsdp", {}), ("deepspeed", {"deepspeed_stage": 2})],
                         ids=["fsdp", "zero2"])
def test_a_sharded_full_model_checkpoint_is_the_live_model_at_its_step(strategy, resources, tmp_path, tiny_model_dir,
                                                                       tuneforge_home):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    full = {"adapter": {"type": "full"}, "training": {"learning_rate": 1e-3, "max_steps": 2},
            "checkpoint": {"every_steps": 2}, "resources": resources}
    job_dir = job_with(tmp_path, tiny_model_dir, strategy, processes=2, strategy=strategy, **full)
    assert run(job_dir, tuneforge_home).status == "succeeded"
    checkpoint = job_dir / "checkpoints" / "step-000002"
    version = job_dir / "model"
    assembled = assemble_checkpoint(version, checkpoint, tmp_path / "registry", kind="model", step=2,
                                    label="checkpoint step 2")
    weights = load_file(assembled / "model.safetensors")
    final = load_file(version / "model.safetensors")  # save_pretrained names the tied LM head by the embeddings
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" not in weights  # as save_model keeps it
    _assert_equal({("model.embed_tokens.weight" if k == "lm_head.weight" else k): v for k, v in weights.items()},
                  final)
    loaded = AutoModelForCausalLM.from_pretrained(assembled, dtype=torch.float32).state_dict()
    for name, tensor in final.items():
        assert torch.allclose(loaded[name], tensor, atol=1e-6, rtol=0), name


def test_a_ppo_checkpoint_gives_the_live_policy_without_its_value_head(tmp_path, tiny_model_dir):
    """PPO runs under DDP (spec/job.py: it samples from whole weights), so rank 0 saves the actor-critic whole: the
    policy's adapter with value_head.safetensors beside it. The policy's adapter is what a job trains from."""
    from test_ppo_recipe import rl_job_dir

    from tuneforge.recipes import ppo

    job_dir = rl_job_dir(tmp_path, tiny_model_dir, "ppo", training={"max_steps": 3}, checkpoint={"every_steps": 3})
    ppo.run(job_dir, progress=False)
    checkpoint = job_dir / "checkpoints" / "step-000003"
    assert saved_in_parts(checkpoint) is None and (checkpoint / "value_head.safetensors").is_file()
    version = job_dir / "adapter"
    assembled = assemble_checkpoint(version, checkpoint, tmp_path / "registry", kind="adapter", step=3,
                                    label="checkpoint step 3")
    assert not (assembled / "value_head.safetensors").exists()
    _assert_equal(load_file(assembled / "adapter_model.safetensors"), load_file(version / "adapter_model.safetensors"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sharded_checkpoint_sealed_at_rest_is_decrypted_then_consolidated(db, tmp_path, tiny_model_dir):
    """As the worker reads a job directory sealed at rest (registry/models.py _materialize_checkpoint): the
    checkpoint's folder, shards included, decrypted into a scratch copy, then consolidated from there."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.engine.checkpoint import save_training_checkpoint
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.engine.weights import publish_final
    from tuneforge.registry.storage.job_files import plaintext_folder, seal_job_dir
    from tuneforge.registry.storage.keys import FolderKeyProvider

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(torch.randn_like(parameter))
    live = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    job_id, _ = make_job(db)
    job_dir = tmp_path / "jobs" / job_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_training_checkpoint(job_dir / "checkpoints", 3, model=CausalLMLoss(model), optimizer=optimizer,
                             scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), scaler=None,
                             trainer_state={}, sharded=True)
    version = publish_final(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "registry" / "abc")
    keys = FolderKeyProvider(tmp_path / "keys")
    seal_job_dir(db, keys, tenant_id="t", job_id=job_id, job_dir=job_dir)
    assert not (job_dir / "checkpoints" / "step-000003" / "sharded" / ".metadata").exists()
    weights = plaintext_folder(db, keys, tenant_id="t", job_id=job_id, job_dir=job_dir, part="checkpoints/step-000003",
                               dest=tmp_path / "scratch")
    assert saved_in_parts(weights) == "fsdp"
    assembled = assemble_checkpoint(version, weights, tmp_path / "registry", kind="adapter", step=3, label="step 3")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       assembled)
    got = {name: p for name, p in loaded.named_parameters() if "lora_" in name}
    assert got.keys() == live.keys()
    for name, tensor in live.items():
        assert torch.equal(got[name], tensor), name
