"""Fault injection: kills, half-written and corrupted checkpoints, SIGTERM, repeated crashes, a full disk.

Every interrupted run must end bit-identical to an uninterrupted one: the same examples in the same
order at every step, the same losses, the same final adapter (CPU, deterministic).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, make_job_dir
from tuneforge.engine.checkpoint import list_checkpoints, verify_checkpoint
from tuneforge.engine.events import read_events

STEPS = 16
SECTIONS = {
    "adapter": {"dropout": 0.1},  # dropout draws random numbers: resume must restore the RNG exactly
    "training": {"max_steps": STEPS, "per_device_batch_size": 4, "gradient_accumulation_steps": 2},
    "evaluation": {"metrics": ["loss"], "eval_every_steps": 4, "max_eval_examples": 8},
    "checkpoint": {"every_steps": 3, "keep_last": 2, "max_restarts": 2},
}


def recipe(job_dir: Path, home: Path, faults: str = "") -> subprocess.Popen:
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_FAULT_INJECTION": faults}
    return subprocess.Popen([sys.executable, "-m", "tuneforge.recipes.sft", "--job-dir", str(job_dir), "--no-progress"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job_dir: Path, home: Path, faults: str = "") -> int:
    process = recipe(job_dir, home, faults)
    output, _ = process.communicate(timeout=600)
    if process.returncode not in (0, 75, -9):
        print(output)
    return process.returncode


def wait_for_step(job_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["type"] == "metrics" and e["data"].get("step", 0) >= step and "train_loss" in e["data"]
               for e in read_events(job_dir)):
            return
        assert process.poll() is None, "the recipe exited before reaching the step"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


def steps_of(job_dir: Path) -> dict[int, tuple]:
    """step -> (train_loss, example_ids); a step run twice (before a kill and after the resume) must agree."""
    seen: dict[int, tuple] = {}
    for event in read_events(job_dir):
        data = event["data"]
        if event["type"] == "metrics" and "train_loss" in data:
            record = (data["train_loss"], tuple(data["example_ids"]))
            assert seen.setdefault(data["step"], record) == record, f"step {data['step']} differs when replayed"
    return seen


def adapter(job_dir: Path) -> dict:
    return load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))


def assert_identical_to(reference: Path, job_dir: Path) -> None:
    assert steps_of(job_dir) == steps_of(reference)
    assert sorted(steps_of(job_dir)) == list(range(1, STEPS + 1))
    ours, theirs = adapter(job_dir), adapter(reference)
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS


def kinds(job_dir: Path) -> list:
    return [e["data"].get("kind") for e in read_events(job_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    home = tmp_path_factory.mktemp("home")
    job_dir = make_job_dir(tmp_path_factory.mktemp("reference"), tiny_model_dir, **SECTIONS)
    assert finish(job_dir, home) == 0
    return job_dir


@pytest.fixture
def job(tmp_path, tiny_model_dir) -> Path:
    return make_job_dir(tmp_path, tiny_model_dir, **SECTIONS)


def test_1_kill_9_at_a_random_step_then_resume_is_bit_identical(reference, job, tuneforge_home):
    kill_step = random.Random(os.getpid()).randint(4, 13)
    process = recipe(job, tuneforge_home)
    wait_for_step(job, kill_step, process)
    process.kill()
    process.wait()
    assert not (job / "summary.json").exists()
    assert finish(job, tuneforge_home) == 0
    assert "resumed" in kinds(job)
    assert_identical_to(reference, job)


def test_2_kill_in_the_middle_of_a_checkpoint_write(reference, job, tuneforge_home):
    assert finish(job, tuneforge_home, "kill_in_checkpoint=9") == -signal.SIGKILL
    staging = [p.name for p in (job / "checkpoints").iterdir() if p.name.startswith(".staging-")]
    assert len(staging) == 1 and staging[0].startswith(".staging-step-000009")  # half written, no manifest
    assert [step for step, _ in list_checkpoints(job / "checkpoints")] == [3, 6]
    assert finish(job, tuneforge_home) == 0
    events = list(read_events(job))
    resumed = [e for e in events if e["data"].get("kind") == "resumed"]
    assert resumed[0]["data"]["step"] == 6
    assert any(e["data"].get("kind") == "checkpoint_discarded" for e in events)
    assert not any(p.name.startswith(".staging-") for p in (job / "checkpoints").iterdir())
    assert_identical_to(reference, job)


@pytest.mark.parametrize("damage", ["flip_a_byte", pytest.param("truncate", marks=pytest.mark.slow)])
def test_3_a_corrupted_newest_checkpoint_is_skipped_with_an_event(reference, job, tuneforge_home, damage):
    assert finish(job, tuneforge_home, "kill_at_step=11") == -signal.SIGKILL
    newest = job / "checkpoints" / "step-000009"
    weights = newest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip_a_byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(newest) is not None

    assert finish(job, tuneforge_home) == 0
    events = list(read_events(job))
    invalid = [e for e in events if e["data"].get("kind") == "checkpoint_invalid"]
    assert invalid and invalid[0]["data"]["path"] == "step-000009" and invalid[0]["level"] == "warning"
    assert ("sha256" if damage == "flip_a_byte" else "bytes") in invalid[0]["data"]["reason"]
    assert [e["data"]["step"] for e in events if e["data"].get("kind") == "resumed"] == [6]
    assert_identical_to(reference, job)


def test_4_sigterm_checkpoints_at_the_step_boundary_and_exits_resumable(reference, job, tuneforge_home):
    process = recipe(job, tuneforge_home)
    wait_for_step(job, 7, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75
    events = list(read_events(job))
    preempted = [e for e in events if e["data"].get("status") == "preempted"]
    assert len(preempted) == 1
    stopped_at = preempted[0]["data"]["step"]
    assert max(steps_of(job)) == stopped_at  # every finished step is in the checkpoint: none is lost
    assert list_checkpoints(job / "checkpoints")[-1][0] == stopped_at
    assert verify_checkpoint(job / "checkpoints" / f"step-{stopped_at:06d}") is None

    assert finish(job, tuneforge_home) == 0
    assert [e["data"]["step"] for e in read_events(job) if e["data"].get("kind") == "resumed"] == [stopped_at]
    assert_identical_to(reference, job)


def test_5_a_crash_that_repeats_fails_after_max_restarts_with_the_reason(job, tuneforge_home):
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "TUNEFORGE_FAULT_INJECTION": "crash_at_step=5"}
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", "--resume", str(job), "--no-progress"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "failed after 3 attempts: InjectedCrash: injected crash after step 5" in result.stderr
    events = list(read_events(job))
    restarts = [e for e in events if e["data"].get("kind") == "restart"]
    assert [e["data"]["attempt"] for e in restarts] == [1, 2]
    # Each restart resumed from the checkpoint at step 3 instead of starting over.
    assert [e["data"]["step"] for e in events if e["data"].get("kind") == "resumed"] == [3, 3]
    assert not (job / "summary.json").exists()


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_6_a_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, job, tuneforge_home):
    checkpoint_events = [e for e in read_events(reference) if e["data"].get("kind") == "checkpoint"]
    size = max(e["data"]["bytes"] for e in checkpoint_events)
    mount_point = job / "checkpoints"
    mount_point.mkdir()
    # Room for one checkpoint and a half: the second save runs out of space part way through.
    if not _mount_tmpfs(mount_point, int(size * 1.5) // 4096 * 4096):
        pytest.skip("needs root to mount a small tmpfs (run the suite as root, as CI does)")
    try:
        assert finish(job, tuneforge_home) == 1
        assert [step for step, _ in list_checkpoints(mount_point)] == [3]
        assert verify_checkpoint(mount_point / "step-000003") is None
        assert not any(p.name.startswith(".staging-") for p in mount_point.iterdir())
        failure = [e for e in read_events(job) if e["level"] == "error"][-1]
        assert "No space left on device" in failure["data"]["error"]
        assert not (job / "summary.json").exists()
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_spot_notice_command_preempts_like_sigterm(job, tuneforge_home, tmp_path):
    notice = tmp_path / "spot-notice"
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "TUNEFORGE_SPOT_NOTICE_COMMAND": f"test -e {notice}",
           "TUNEFORGE_SPOT_NOTICE_INTERVAL": "0.05"}
    process = subprocess.Popen([sys.executable, "-m", "tuneforge.recipes.sft", "--job-dir", str(job), "--no-progress"],
                               env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(job, 2, process)
    notice.touch()
    assert process.wait(timeout=120) == 75
    preempted = [e for e in read_events(job) if e["data"].get("status") == "preempted"]
    assert preempted and preempted[0]["data"]["reason"] == "spot notice (command)"


def test_a_resume_from_checkpoints_sealed_at_rest_is_bit_identical(reference, job, tuneforge_home, tmp_path):
    """What the worker does between runs with encryption at rest: the stopped run's checkpoints are sealed
    in place (no safetensors header, no trainer state left readable), then unsealed for the run that resumes,
    which ends exactly where an uninterrupted run does (registry/storage/job_files.py)."""
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.registry.storage import job_files
    from tuneforge.registry.storage.keys import FolderKeyProvider

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(db.engine)
    keys = FolderKeyProvider(tmp_path / "keys")
    process = recipe(job, tuneforge_home)
    wait_for_step(job, 5, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75
    sealed = job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job)
    assert sealed.files >= 5
    checkpoint_files = [p for p in (job / "checkpoints").rglob("*") if p.is_file()]
    assert checkpoint_files and all(p.name.endswith(".tfe") for p in checkpoint_files)
    for path in checkpoint_files:
        data = path.read_bytes()
        assert b'"dtype"' not in data and b'"step"' not in data and b"PK\x03\x04" not in data, path  # safetensors, json, torch zip
    assert job_files.unseal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job) == len(checkpoint_files)
    assert finish(job, tuneforge_home) == 0
    assert "resumed" in kinds(job)
    assert_identical_to(reference, job)
    db.dispose()
