"""A checkpoint saved in parts (torch.distributed.checkpoint, as FSDP saves one) consolidated on CPU, without a process
group, is exactly what a single-process checkpoint of the same model holds: the adapter (or the full model, its tied
LM head once), and of PPO's actor-critic the policy without its value head; a checkpoint of another model is refused
by name; assembling one for a job goes through its own process and loads as the checkpoint's weights.

The checkpoints here are written by engine/checkpoint.py's own sharded path in one process (DCP needs no process
group); test_distributed_checkpoint_consolidation.py does it with 2-process FSDP and DeepSpeed jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from tuneforge.engine import checkpoint as engine_checkpoint  # noqa: E402
from tuneforge.engine.rl import policy as rl_policy  # noqa: E402
from tuneforge.registry import consolidate  # noqa: E402
from tuneforge.registry.checkpoints import WEIGHTS, CheckpointUnavailable, assemble_checkpoint  # noqa: E402


def test_the_folder_names_are_the_engines():
    assert consolidate.SHARDED_DIR == engine_checkpoint.SHARDED_DIR
    assert (consolidate.DEEPSPEED_DIR, consolidate.DEEPSPEED_TAG) == (engine_checkpoint.DEEPSPEED_DIR,
                                                                      engine_checkpoint.DEEPSPEED_TAG)


def _model(base_dir: Path, *, kind: str, seed: int):
    """A trained-looking model: LoRA (B not zero) or the full model with every weight moved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if kind == "adapter":
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _saved(model, loss_module, directory: Path, *, sharded: bool) -> Path:
    """What engine/checkpoint.py writes for this model: DCP shards of the loss module, or save_trainable's file."""
    optimizer = torch.optim.AdamW([p for p in loss_module.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module = loss_module if sharded else model  # the runtime's state_module: the wrapped root under FSDP
    return engine_checkpoint.save_training_checkpoint(directory, 3, model=module, optimizer=optimizer,
                                                      scheduler=scheduler, scaler=None, trainer_state={},
                                                      sharded=sharded)


def _version(model, tokenizer_dir: Path, directory: Path) -> Path:
    """The version the job made: its final weights, published as the runtime does."""
    from transformers import AutoTokenizer

    from tuneforge.engine.weights import publish_final

    return publish_final(model, AutoTokenizer.from_pretrained(tokenizer_dir), directory)


def _assert_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("kind", ["adapter", "model"])
def test_a_sharded_checkpoint_consolidates_to_the_single_process_weights(kind, tiny_model_dir, tmp_path):
    from tuneforge.engine.loss import CausalLMLoss

    model = _model(tiny_model_dir, kind=kind, seed=1)
    loss = CausalLMLoss(model)
    sharded = _saved(model, loss, tmp_path / "sharded-run", sharded=True)
    single = _saved(model, loss, tmp_path / "single-run", sharded=False)
    assert consolidate.saved_in_parts(sharded) == "fsdp" and consolidate.saved_in_parts(single) is None
    version = _version(model, tiny_model_dir, tmp_path / "version")
    out = tmp_path / "out" / WEIGHTS[kind]
    consolidate.consolidate(sharded, version, kind=kind, out=out)
    _assert_equal(load_file(out), load_file(single / WEIGHTS[kind]))
    if kind == "model":  # tied embeddings: one name, as save_model keeps it, though the version names the other
        assert "lm_head.weight" not in load_file(version / "model.safetensors")
        assert len(load_file(out)) == len(load_file(version / "model.safetensors"))


def test_ppo_actor_critic_gives_the_policy_and_leaves_the_value_head_out(tiny_model_dir, tmp_path):
    from tuneforge.engine.rl.losses import PpoLoss

    policy = _model(tiny_model_dir, kind="adapter", seed=2)
    actor_critic = rl_policy.ActorCritic(policy, policy.config.hidden_size)
    loss = PpoLoss(actor_critic, clip_range=0.2, clip_range_value=0.2, value_coef=0.1, temperature=1.0)
    sharded = _saved(actor_critic, loss, tmp_path / "sharded-run", sharded=True)
    single = _saved(actor_critic, loss, tmp_path / "single-run", sharded=False)
    assert (single / rl_policy.VALUE_HEAD_WEIGHTS).is_file()  # single-process PPO keeps the head beside the adapter
    version = _version(policy, tiny_model_dir, tmp_path / "version")
    out = tmp_path / "out.safetensors"
    consolidate.consolidate(sharded, version, kind="adapter", out=out)
    _assert_equal(load_file(out), load_file(single / "adapter_model.safetensors"))
    assert not any("value_head" in name for name in load_file(out))


def test_a_checkpoint_of_another_model_is_refused_by_name(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.loss import CausalLMLoss

    model = _model(tiny_model_dir, kind="adapter", seed=3)
    sharded = _saved(model, CausalLMLoss(model), tmp_path / "run", sharded=True)
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, target_modules=["q_proj"]))
    version = _version(other, tiny_model_dir, tmp_path / "other-version")
    with pytest.raises(consolidate.ConsolidationError, match="do not match the version's final adapter .*v_proj"):
        consolidate.consolidate(sharded, version, kind="adapter", out=tmp_path / "out.safetensors")
    wider = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    version = _version(wider, tiny_model_dir, tmp_path / "wider-version")
    with pytest.raises(consolidate.ConsolidationError, match="has shape .*: a checkpoint of another model"):
        consolidate.consolidate(sharded, version, kind="adapter", out=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_assembling_a_sharded_checkpoint_gives_a_model_with_its_weights(tiny_model_dir, tmp_path):
    """Through registry/checkpoints.py as the worker runs it (consolidation in its own process): the assembled
    adapter loads onto the base as the checkpoint's weights; a refusal names the checkpoint, not a path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.loss import CausalLMLoss

    model = _model(tiny_model_dir, kind="adapter", seed=4)
    sharded = _saved(model, CausalLMLoss(model), tmp_path / "run", sharded=True)
    live = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    final = _model(tiny_model_dir, kind="adapter", seed=5)  # the job went on: its final adapter differs
    version = _version(final, tiny_model_dir, tmp_path / "registry" / "abc123")
    assembled = assemble_checkpoint(version, sharded, tmp_path / "registry", kind="adapter", step=3,
                                    label="checkpoint step 3 of job j")
    assert assembled.name == "abc123-ckpt-step-3"
    assert json.loads((assembled / "adapter_config.json").read_text())["r"] == 4
    assert not list(assembled.glob("optimizer*")) and not (assembled / "sharded").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       assembled)
    got = {name: p for name, p in loaded.named_parameters() if "lora_" in name}
    assert got.keys() == live.keys()
    for name, tensor in live.items():
        assert torch.allclose(got[name], tensor, atol=1e-6, rtol=0), name

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # a full model's version: the adapter is refused
    full_version = _version(other, tiny_model_dir, tmp_path / "registry" / "def456")
    refusal = (r"checkpoint step 3 of job j \(fsdp\) cannot be trained from: its fsdp weights do not match the "
               r"version's final model")
    with pytest.raises(CheckpointUnavailable, match=refusal) as refused:
        assemble_checkpoint(full_version, sharded, tmp_path / "registry", kind="model", step=3,
                            label="checkpoint step 3 of job j")
    assert str(tmp_path) not in str(refused.value)
    assert not (tmp_path / "registry" / "def456-ckpt-step-3").exists()
    assert not list((tmp_path / "registry").glob(".staging-*"))
