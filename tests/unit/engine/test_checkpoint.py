import json

import pytest

from tuneforge.engine.checkpoint import (
    commit_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_staging,
    verify_checkpoint,
)


def write_files(payload: bytes):
    def write(directory):
        (directory / "weights.bin").write_bytes(payload)
        (directory / "state.json").write_text("{}")
    return write


def test_commit_writes_a_manifest_that_verifies(tmp_path):
    path = commit_checkpoint(tmp_path, 10, write_files(b"abc"))
    assert path.name == "step-000010"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.bin", "state.json"} and manifest["files"]["weights.bin"]["bytes"] == 3
    assert verify_checkpoint(path) is None


def test_corruption_and_truncation_are_detected(tmp_path):
    first = commit_checkpoint(tmp_path, 1, write_files(b"one"))
    second = commit_checkpoint(tmp_path, 2, write_files(b"two"))
    (second / "weights.bin").write_bytes(b"tw0")
    assert "sha256" in verify_checkpoint(second)
    (second / "weights.bin").write_bytes(b"t")
    assert "bytes" in verify_checkpoint(second)
    skipped = []
    assert latest_valid_checkpoint(tmp_path, lambda p, why: skipped.append(p.name)) == first
    assert skipped == ["step-000002"]


def test_a_failed_write_leaves_nothing(tmp_path):
    def explode(directory):
        (directory / "weights.bin").write_bytes(b"partial")
        raise OSError("No space left on device")

    commit_checkpoint(tmp_path, 1, write_files(b"one"))
    with pytest.raises(OSError):
        commit_checkpoint(tmp_path, 2, explode)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_staging_leftovers_are_removed_and_prune_keeps_protected(tmp_path):
    paths = [commit_checkpoint(tmp_path, step, write_files(b"x")) for step in (1, 2, 3, 4)]
    (tmp_path / ".staging-step-000005-123").mkdir()
    assert [p.name for p in remove_staging(tmp_path)] == [".staging-step-000005-123"]
    prune_checkpoints(tmp_path, keep_last=2, protect={paths[0]})
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 3, 4]


def test_keeper_keeps_the_newest_the_best_and_the_resumed_from(tmp_path):
    import torch

    from tuneforge.engine.checkpoint import CheckpointKeeper, restore_training_checkpoint

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    keeper = CheckpointKeeper(tmp_path, every_steps=2, every_minutes=None, keep_last=2)
    assert [keeper.due(step) for step in (1, 2, 3, 4)] == [False, True, False, True]
    for step, valid_loss in [(2, 3.0), (4, 1.0), (6, 2.0), (8, 2.5), (10, 2.2)]:
        model.weight.data.fill_(step)
        _, is_best = keeper.save(step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                                 trainer_state={"metrics": {"valid_loss": valid_loss}})
        assert is_best == (step in (2, 4))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 8, 10]  # the best (4) survives
    assert keeper.best == {"step": 4, "metric": "loss", "value": 1.0, "direction": "min"}

    state = restore_training_checkpoint(tmp_path / "step-000004", model=model, optimizer=optimizer,
                                        scheduler=scheduler, scaler=None)
    assert state["step"] == 4 and state["best"] == {"step": 4, "metric": "loss", "value": 1.0, "direction": "min"}
    assert torch.equal(model.weight.data, torch.full((2, 4), 4.0))
