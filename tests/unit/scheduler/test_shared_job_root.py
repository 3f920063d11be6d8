"""A job on several nodes is refused at submission unless a worker that could run it has its job root on
storage every node sees (TUNEFORGE_SHARED_JOB_ROOT, or the kubernetes executor's PVC), as each worker reports;
and the one exit code the Ray executor reads from a job's nodes (the run itself: tests/integration/test_ray_multinode.py)."""

from __future__ import annotations

import pytest

from tuneforge.scheduler.executors import job_root_shared
from tuneforge.scheduler.submission import check_submission
from tuneforge.settings import Settings, SettingsError
from tuneforge.spec import validate_job_spec

NODE = {"gpu_type": "h100-80gb", "gpus": 8, "strategies": ["ddp", "fsdp"], "reporters": []}


def spec(num_nodes: int):
    return validate_job_spec({"model": {"base_model": "tiny-llama"}, "dataset": {"path": "file-1"},
                              "resources": {"num_nodes": num_nodes, "num_gpus": 8, "gpu_type": "h100-80gb",
                                            "strategy": "fsdp"}})


def worker(executor: str, shared: bool | None, nodes: int = 2) -> dict:
    node = dict(NODE) if shared is None else {**NODE, "shared_job_root": shared}
    return {"worker": f"w-{executor}", "executor": executor, "nodes": [node] * nodes}


def test_a_multi_node_job_on_a_worker_without_a_shared_job_root_is_refused_with_the_fix():
    problem = check_submission(spec(2), [worker("ray", False)]).problem
    assert problem.code == "job_root_not_shared" and problem.param == "tuneforge.resources.num_nodes"
    assert "TUNEFORGE_SHARED_JOB_ROOT=1" in problem.message and "executor ray" in problem.message


def test_a_shared_job_root_or_one_node_or_a_worker_that_does_not_say_passes():
    assert check_submission(spec(2), [worker("ray", True)]).problem is None
    assert check_submission(spec(2), [worker("ray", False), worker("kubernetes", True)]).problem is None
    assert check_submission(spec(1), [worker("ray", False)]).problem is None  # one node: its own disk will do
    assert check_submission(spec(2), [worker("ray", None)]).problem is None  # predates the report: not refused
    # A worker that could never hold the job does not make it refusable for storage: capacity speaks.
    problem = check_submission(spec(2), [worker("local", True, nodes=1)]).problem
    assert problem.code == "insufficient_capacity"


def test_which_executors_share_their_job_root(monkeypatch):
    assert not job_root_shared("ray", Settings.from_env())
    assert not job_root_shared("local", Settings.from_env())
    assert job_root_shared("kubernetes", Settings.from_env())  # the PVC every pod mounts
    monkeypatch.setenv("TUNEFORGE_SHARED_JOB_ROOT", "1")
    assert job_root_shared("ray", Settings.from_env())
    monkeypatch.setenv("TUNEFORGE_SHARED_JOB_ROOT", "maybe")
    with pytest.raises(SettingsError, match="TUNEFORGE_SHARED_JOB_ROOT"):
        Settings.from_env()


def test_a_gangs_exit_code_is_its_first_failure_else_a_stop_else_success():
    """The Ray executor's one code for a job's nodes (launch/outcome.py reads the recipe's events beside it)."""
    from tuneforge.scheduler.executors.ray_cluster import NODE_LOST, gang_exit_code

    assert gang_exit_code([0, 0]) == 0
    assert gang_exit_code([75, 0]) == 75  # one node had finished its last step when the stop came
    assert gang_exit_code([75, 1]) == 1 and gang_exit_code([NODE_LOST, 1]) == NODE_LOST
    assert gang_exit_code([0, 2]) == 2  # bad input stays bad input: never retried
