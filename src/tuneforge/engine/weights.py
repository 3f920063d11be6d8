"""Save and restore what a job trains (the LoRA adapter, or all weights) and publish the final result."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_trainable(model, directory: Path) -> None:
    """Only the trained weights: the adapter for PEFT models, every weight for full fine-tuning. A model
    made of parts (RL's policy and value head) saves itself through its own save_trainable."""
    if hasattr(model, "save_trainable"):
        model.save_trainable(directory)
        return
    if is_peft(model):
        from peft import get_peft_model_state_dict

        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(directory / ADAPTER_WEIGHTS))
    else:
        save_model(model, str(directory / FULL_WEIGHTS))  # de-duplicates tied embeddings


def load_trainable(model, directory: Path) -> None:
    if hasattr(model, "load_trainable"):
        model.load_trainable(directory)
        return
    if is_peft(model):
        from peft import set_peft_model_state_dict

        device = next(p.device for p in model.parameters() if p.requires_grad)
        result = set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS), device=str(device)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {directory} has weights this adapter does not: {result.unexpected_keys[:5]}")
    else:
        load_model(model, str(directory / FULL_WEIGHTS), strict=True, device=str(next(model.parameters()).device))


def publish_final(model, tokenizer, target: Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the final adapter (PEFT format) or model (HF format) with its tokenizer, atomically.

    state_dict: the weights to write instead of the model's own (a sharded model's, gathered)."""
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with torch.no_grad():
            if state_dict is None:
                model.save_pretrained(staging)
            else:
                if getattr(model.config, "tie_word_embeddings", False) and not is_peft(model):
                    # One tensor under two names; the config re-ties them on load.
                    state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
                model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
