"""Optimizers and learning-rate schedules named by the job spec."""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.spec.job import TrainingSpec


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with weight decay on matrices only (not on biases, norms or 1-d scales); an empty
    group is left out (DeepSpeed drops empty groups, which leaves the LR schedule with one group too many)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # Under ZeRO-3 a parameter's data is its empty 1-d partition until gathered; ds_shape is its real shape.
            shape = getattr(parameter, "ds_shape", None) or parameter.shape
            (decay if len(shape) >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    groups = parameter_groups(model, spec.weight_decay)
    lr = spec.learning_rate
    if spec.optimizer == "adamw":
        on_cuda = any(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=on_cuda or None)
    if spec.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if spec.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if spec.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainingSpec, total_steps: int):
    """Linear warmup over warmup_ratio of the steps, then cosine / linear decay to 0 or constant."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[spec.lr_scheduler]
    warmup = math.ceil(spec.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
