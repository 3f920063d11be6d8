"""Consolidating a checkpoint saved in parts (FSDP's torch.distributed.checkpoint shards, DeepSpeed's ZeRO
partitions) into the one weights file a single-process checkpoint holds, so a job can train from it.

It runs on CPU without a process group, through the libraries' own readers, in a process of its own
(`python -m tuneforge.registry.consolidate`, started by registry/checkpoints.py): the worker never imports torch,
and reading a large model cannot take it down. The names a single-process checkpoint has are those of the version
the checkpoint's job made (its final weights, written by the same model), so they are checked against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# engine/checkpoint.py's folder names (a test checks they agree): registry/ may not import the engine.
SHARDED_DIR = "sharded"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
# The loss module a recipe trains (engine/loss.py, engine/rl/losses.py) holds the model as `model`; PPO's is the
# actor-critic (engine/rl/policy.py), the policy with its value head beside it.
LOSS_PREFIX = "model."
POLICY, VALUE_HEAD = "policy.", "value_head."
ADAPTER_NAME = "default"  # the PEFT adapter engine/adapters.py creates; PEFT drops its name from saved keys
REFUSED = 2  # the exit status of a checkpoint that cannot be consolidated (the reason on stderr)


class ConsolidationError(ValueError):
    """The checkpoint cannot become a single-process one: the reason, naming the file or tensor."""


def saved_in_parts(checkpoint: Path) -> str | None:
    """'fsdp' or 'deepspeed' when the checkpoint's weights are shards or partitions, else None."""
    if (checkpoint / SHARDED_DIR / ".metadata").is_file():
        return "fsdp"
    if (checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    return None


def consolidate(checkpoint: Path, version_dir: Path, *, kind: str, out: Path) -> None:
    """Write out: the checkpoint's trained weights as save_trainable writes them in one process (the adapter,
    or the full model with tied weights once), each tensor in the dtype of the version's final weights."""
    from safetensors.torch import save_file

    layout = saved_in_parts(checkpoint)
    if layout is None:
        raise ConsolidationError("it holds neither FSDP shards (sharded/) nor DeepSpeed partitions (deepspeed/)")
    weights = _policy_weights(_fsdp_state(checkpoint) if layout == "fsdp" else _deepspeed_state(checkpoint))
    final = _final_weights(version_dir, kind)
    weights, twins = (_adapter_names(weights), {}) if kind == "adapter" else (weights, _twins(weights, final))
    expected = _checked(weights, twins, final, f"its {layout} weights", f"the version's final {kind}")
    # Copies: zero_to_fp32's tensors are views of one flat buffer, which safetensors would take for shared weights.
    weights = {name: tensor.to(expected[name][0], copy=True) for name, tensor in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in _tied_once(weights, twins).items()}, str(out))


def _checked(weights: dict, twins: dict, final: dict, ours: str, theirs: str) -> dict:
    """{name: (dtype, shape)} the version's final weights give each of ours (a tied one its twin's), once ours
    are exactly theirs by name and shape."""
    named = set(weights) - set(twins)
    missing, extra = sorted(set(final) - named), sorted(named - set(final))
    if missing or extra:
        raise ConsolidationError(f"{ours} do not match {theirs} (missing {missing[:3]}, not in it {extra[:3]}): a "
                                 "checkpoint of another model or format")
    expected = {**final, **{alias: final[name] for alias, name in twins.items()}}
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name][1]:
            raise ConsolidationError(f"{ours}: {name!r} has shape {tuple(tensor.shape)}, {theirs} "
                                     f"{expected[name][1]}: a checkpoint of another model")
    return expected


def _fsdp_state(checkpoint: Path) -> dict:
    """The loss module's trainable weights of a torch.distributed.checkpoint save (engine/checkpoint.py
    _sharded_state: {"model": ..., "optimizer": ...}), read whole in this process."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(checkpoint / SHARDED_DIR))
    if not loaded.get("model"):
        raise ConsolidationError(f"{SHARDED_DIR}/ holds no model weights")
    return loaded["model"]


def _deepspeed_state(checkpoint: Path) -> dict:
    """The loss module's trainable weights of a ZeRO checkpoint, rebuilt in fp32 from every rank's partitions by
    DeepSpeed's own zero_to_fp32 (stage 2 or 3; frozen weights were excluded when it was saved)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as exc:
        raise ConsolidationError("it was saved by DeepSpeed, which is not installed on this worker") from exc
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                                    exclude_frozen_parameters=True)


def _policy_weights(state: dict) -> dict:
    """The model's own names (the loss module's prefix removed); of PPO's actor-critic, the policy's alone: a job
    trains from the policy, and the value head is PPO's own (a PPO job from it starts a new one)."""
    strange = next((name for name in state if not name.startswith(LOSS_PREFIX)), None)
    if strange is not None:
        raise ConsolidationError(f"its weight {strange!r} is not a trained model's (a recipe this cannot read)")
    weights = {name[len(LOSS_PREFIX):]: tensor for name, tensor in state.items()}
    if all(name.startswith((POLICY, VALUE_HEAD)) for name in weights):
        weights = {name[len(POLICY):]: tensor for name, tensor in weights.items() if name.startswith(POLICY)}
    return weights


def _adapter_names(weights: dict) -> dict:
    """The adapter's weights under the names PEFT saves them (get_peft_model_state_dict keeps the weights named
    after the adapter and removes its name). A sharded save of the trainable weights also holds a frozen weight
    tied to one of the base's (the LM head to the embeddings): it is the base's, not the adapter's."""
    marker = f".{ADAPTER_NAME}"
    return {name.replace(marker, ""): tensor for name, tensor in weights.items() if f"{marker}." in name}


def _twins(weights: dict, expected: dict) -> dict:
    """{name: the name it is tied to} of a full model's weights the version names once (save_pretrained writes a
    tied LM head as the embeddings alone): the names a sharded save holds beside their twin, with its values."""
    import torch

    twins = {}
    for name in (n for n in weights if n not in expected):
        tensor = weights[name]
        twin = next((other for other in expected if other in weights and weights[other].shape == tensor.shape
                     and torch.equal(weights[other], tensor)), None)
        if twin is not None:
            twins[name] = twin
    return twins


def _tied_once(weights: dict, twins: dict) -> dict:
    """The weights as safetensors' save_model writes them (engine/weights.py save_trainable): tied ones under one
    name, the one save_model keeps."""
    from safetensors.torch import _remove_duplicate_names  # save_model's own rule for which name stays

    shared = {**weights, **{alias: weights[name] for alias, name in twins.items()}}  # one tensor, as the model held it
    for dropped in _remove_duplicate_names(shared).values():
        for name in dropped:
            del shared[name]
    return shared


def _final_weights(version_dir: Path, kind: str) -> dict:
    """{tensor name: (dtype, shape)} of the version's final weights (safetensors headers only: no tensor is read)."""
    from safetensors import safe_open

    files = ([version_dir / "adapter_model.safetensors"] if kind == "adapter" else
             sorted(p for p in version_dir.glob("*.safetensors")))
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConsolidationError(f"the version's final {kind} weights are not safetensors, so their names are unknown")
    dtypes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                dtypes[name] = (_torch_dtype(tensor.get_dtype()), tuple(tensor.get_shape()))
    return dtypes


def _torch_dtype(name: str):
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise ConsolidationError(f"the version's final weights hold a {name} tensor, which a checkpoint never does")
    return table[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.registry.consolidate", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="the checkpoint folder (sharded/ or deepspeed/ in it)")
    parser.add_argument("version", type=Path, help="the materialized version the checkpoint's job made")
    parser.add_argument("kind", choices=["adapter", "model"])
    parser.add_argument("out", type=Path, help="the weights file to write")
    args = parser.parse_args(argv)
    try:
        consolidate(args.checkpoint, args.version, kind=args.kind, out=args.out)
    except ConsolidationError as exc:
        print(json.dumps({"refused": str(exc)}), file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
