"""`tuneforge simulate` replays jobs through the real placement code: every job runs once, never on more GPUs
than exist, and the report shows waits, utilization and cost."""

from __future__ import annotations

from tuneforge.cli import main
from tuneforge.scheduler.simulation import Cluster, month_of_jobs, simulate


def test_every_job_runs_once_within_capacity_and_big_jobs_are_not_starved():
    jobs = month_of_jobs(count=200, days=6, tenants=3, seed=1)
    cluster = Cluster.of(gpus=48)
    result = simulate(jobs, cluster, reserve_after_s=2 * 3600, days=6)
    assert result.never_started == [] and set(result.waits_s) == {job.job_id for job in jobs}
    assert all(wait >= 0 for wait in result.waits_s.values())
    assert 0 < result.busy_gpu_s_in_window <= cluster.gpus * result.window_s
    assert any(job.gpus == 16 for job in jobs)  # two-node jobs were placed too
    assert month_of_jobs(count=200, days=6, tenants=3, seed=1) == jobs  # seeded


def test_simulate_command_prints_waits_utilization_and_cost(capsys):
    assert main(["simulate", "--jobs", "100", "--days", "3", "--gpus", "40"]) == 0
    out = capsys.readouterr().out
    assert "queue wait (h): p50" in out and "GPU utilization" in out and "cost at $2.50/GPU-h" in out
