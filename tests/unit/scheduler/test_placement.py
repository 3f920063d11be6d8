"""Placement rules: fair share between tenants, priority within one, limits, best fit, multi-node, reservation."""

from __future__ import annotations

from tuneforge.scheduler.placement import JobRequest, Node, TenantPolicy, Usage, assign, plan


def job(job_id, tenant="t", gpus=1, nodes=1, gpu_type="any", priority=0, seq=0, since=0.0):
    return JobRequest(job_id, tenant, gpus, nodes, gpu_type, priority, seq, since)


def placed(result):
    return [p.job.job_id for p in result.placements]


def test_fair_share_alternates_between_tenants_and_priority_orders_within_one():
    queue = [job("a1", "a", seq=1), job("a2", "a", seq=2), job("a3", "a", seq=3, priority=5), job("b1", "b", seq=4)]
    result = plan(queue, [Node("cpu", 3)], [3])
    assert placed(result) == ["a3", "b1", "a1"]


def test_the_tenant_holding_fewer_gpus_goes_first_weighted():
    queue = [job("a1", "a", seq=1), job("b1", "b", seq=2)]
    busy = {"a": Usage(jobs=1, gpus=1), "b": Usage(jobs=2, gpus=4)}
    assert placed(plan(queue, [Node("cpu", 1)], [1], usage=busy)) == ["a1"]
    weights = {"b": TenantPolicy(weight=8.0)}  # b's 4 GPUs count as 0.5
    assert placed(plan(queue, [Node("cpu", 1)], [1], usage=busy, policies=weights)) == ["b1"]


def test_tenant_limits_on_running_jobs_and_gpus():
    queue = [job(f"a{i}", "a", seq=i) for i in range(4)] + [job("b-big", "b", gpus=3, seq=9), job("b1", "b", seq=10)]
    policies = {"a": TenantPolicy(max_running_jobs=2), "b": TenantPolicy(max_gpus=2)}
    result = plan(queue, [Node("cpu", 8)], [8], policies=policies)
    assert sorted(placed(result)) == ["a0", "a1", "b1"]


def test_best_fit_types_and_multi_node():
    nodes = [Node("a100-80gb", 8), Node("a100-80gb", 8), Node("h100-80gb", 8)]
    assert assign(job("x", gpus=2), nodes, [8, 3, 8]) == ((1, 2),)  # the tightest node that fits
    assert assign(job("x", gpus=2, gpu_type="h100-80gb"), nodes, [8, 8, 1]) is None
    assert assign(job("x", gpus=8, nodes=2, gpu_type="a100-80gb"), nodes, [8, 8, 8]) == ((0, 8), (1, 8))
    assert assign(job("x", gpus=8, nodes=2, gpu_type="a100-80gb"), nodes, [8, 7, 8]) is None


def test_backfill_until_a_long_waiting_job_reserves_the_nodes():
    nodes = [Node("h100-80gb", 8)]
    queue = [job("big", "a", gpus=8, seq=1, since=0.0), job("small", "b", gpus=2, seq=2, since=0.0)]
    fresh = plan(queue, nodes, [4], now=10.0, reserve_after=3600)
    assert placed(fresh) == ["small"] and fresh.blocked_by is None
    starved = plan(queue, nodes, [4], now=7200.0, reserve_after=3600)
    assert placed(starved) == [] and starved.blocked_by.job_id == "big"
    never_fits_here = [job("huge", "a", gpus=16, seq=1), job("small", "b", gpus=2, seq=2)]
    assert placed(plan(never_fits_here, nodes, [4], now=7200.0, reserve_after=3600)) == ["small"]
