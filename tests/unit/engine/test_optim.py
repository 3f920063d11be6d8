import pytest
import torch

from tuneforge.engine.optim import build_optimizer, build_scheduler, parameter_groups
from tuneforge.spec.job import TrainingSpec


def rates(name: str, steps: int = 10) -> list[float]:
    model = torch.nn.Linear(2, 2)
    spec = TrainingSpec(lr_scheduler=name, warmup_ratio=0.2, learning_rate=1.0)
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec, steps)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_warm_up_then_follow_their_shape():
    cosine, linear, constant = rates("cosine"), rates("linear"), rates("constant")
    for curve in (cosine, linear, constant):
        assert curve[:3] == pytest.approx([0.0, 0.5, 1.0])  # two warmup steps (20% of 10)
    assert constant[2:] == pytest.approx([1.0] * 8)
    assert linear[2:] == pytest.approx([1 - i / 8 for i in range(8)])
    assert cosine[6] == pytest.approx(0.5) and all(a >= b for a, b in zip(cosine[2:], cosine[3:]))


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = parameter_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    model[0].weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in parameter_groups(model, 0.1)) == 3  # frozen weights are not optimized


def test_zero3_partitions_are_grouped_by_their_real_shape_and_empty_groups_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for parameter in model.parameters():  # what ZeRO-3's zero.Init leaves: an empty 1-d partition and ds_shape
        parameter.ds_shape = parameter.shape
        parameter.data = torch.empty(0)
    groups = parameter_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[0]["params"][0] is model[0].weight
    norms_only = parameter_groups(torch.nn.LayerNorm(4), 0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in norms_only] == [(2, 0.0)]  # no empty decay group
