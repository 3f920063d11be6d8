"""Capacity simulation: replay a month of jobs through the real placement code (scheduler/placement.py) on a
simulated cluster, and report queue waits, GPU utilization and cost. `tuneforge simulate` runs it.

The workload follows the capacity-planning brief: 60% 7B jobs on 1-4 GPUs for ~12 h, 30% 13-34B jobs on
4-8 GPUs (~24 h, an assumption: the brief gives no duration), 10% 70B jobs on 8-16 GPUs for ~48 h;
durations are log-normal around those medians; arrivals follow working hours (weekdays 09-19 three times
as busy as nights and weekends), so queues build during the day; tenants submit unequal shares (the first
tenant most), so fair share has something to do.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

from tuneforge.scheduler.placement import JobRequest, Node, TenantPolicy, Usage, plan

HOUR = 3600.0
DAY = 24 * HOUR

# (share of jobs, class name, GPU choices, nodes needed per choice, median hours)
WORKLOAD = (
    (0.60, "7B", (1, 2, 4), 12.0),
    (0.30, "13-34B", (4, 8), 24.0),
    (0.10, "70B", (8, 16), 48.0),
)


@dataclass(frozen=True)
class SimJob:
    job_id: str
    tenant: str
    size_class: str
    gpus: int
    submit_s: float
    duration_s: float


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]

    @classmethod
    def of(cls, *, gpus: int, gpus_per_node: int = 8, gpu_type: str = "h100-80gb") -> Cluster:
        full, rest = divmod(gpus, gpus_per_node)
        nodes = [Node(gpu_type, gpus_per_node)] * full + ([Node(gpu_type, rest)] if rest else [])
        return cls(tuple(nodes))

    @property
    def gpus(self) -> int:
        return sum(node.gpus for node in self.nodes)


@dataclass
class SimResult:
    window_s: float
    waits_s: dict[str, float] = field(default_factory=dict)  # job id -> queue wait
    jobs: dict[str, SimJob] = field(default_factory=dict)
    busy_gpu_s_in_window: float = 0.0
    demand_gpu_s: float = 0.0
    makespan_s: float = 0.0
    never_started: list[str] = field(default_factory=list)
    peak_queue: int = 0


def month_of_jobs(*, count: int = 1000, days: float = 30.0, tenants: int = 5, seed: int = 0,
                  gpus_per_node: int = 8) -> list[SimJob]:
    rng = random.Random(seed)
    tenant_names = [f"tenant-{i + 1}" for i in range(tenants)]
    tenant_weights = [1.0 / (i + 1) for i in range(tenants)]
    jobs = []
    for i in range(count):
        _, name, choices, median_h = rng.choices(WORKLOAD, weights=[w[0] for w in WORKLOAD])[0]
        gpus = rng.choice(choices)
        if gpus > gpus_per_node and gpus % gpus_per_node:
            gpus = math.ceil(gpus / gpus_per_node) * gpus_per_node
        jobs.append(SimJob(
            job_id=f"job-{i:05d}", tenant=rng.choices(tenant_names, weights=tenant_weights)[0], size_class=name,
            gpus=gpus, submit_s=_arrival(rng, days), duration_s=rng.lognormvariate(math.log(median_h), 0.5) * HOUR,
        ))
    return sorted(jobs, key=lambda job: job.submit_s)


def _arrival(rng: random.Random, days: float) -> float:
    """A submission time, three times likelier in weekday working hours than at night or on weekends."""
    while True:
        t = rng.uniform(0, days * DAY)
        day, hour = int(t // DAY), (t % DAY) / HOUR
        busy = day % 7 < 5 and 9 <= hour < 19
        if busy or rng.random() < 1 / 3:
            return t


def _request(job: SimJob, seq: int, gpus_per_node: int) -> JobRequest:
    nodes = max(1, math.ceil(job.gpus / gpus_per_node))
    return JobRequest(job_id=job.job_id, tenant_id=job.tenant, gpus_per_node=job.gpus // nodes, num_nodes=nodes,
                      seq=seq, queued_since=job.submit_s)


def simulate(jobs: list[SimJob], cluster: Cluster, *, reserve_after_s: float = 2 * HOUR,
             policies: dict[str, TenantPolicy] | None = None, days: float = 30.0) -> SimResult:
    """Discrete-event replay: at every arrival or completion, placement.plan() decides what starts."""
    nodes = list(cluster.nodes)
    per_node = max(node.gpus for node in nodes)
    free = [node.gpus for node in nodes]
    result = SimResult(window_s=days * DAY, jobs={job.job_id: job for job in jobs})
    result.demand_gpu_s = sum(job.gpus * job.duration_s for job in jobs)
    events: list[tuple[float, int, str, tuple]] = []  # (time, order, kind, payload)
    for seq, job in enumerate(jobs):
        heapq.heappush(events, (job.submit_s, 1, "arrive", (job, seq)))
    queue: dict[str, JobRequest] = {}
    usage: dict[str, Usage] = {}
    busy, last_t = 0, 0.0
    while events:
        t = events[0][0]
        result.busy_gpu_s_in_window += busy * max(0.0, min(t, result.window_s) - min(last_t, result.window_s))
        last_t = t
        while events and events[0][0] == t:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                job, seq = payload
                queue[job.job_id] = _request(job, seq, per_node)
            else:
                request, taken = payload
                for index, gpus in taken:
                    free[index] += gpus
                busy -= request.gpus
                usage[request.tenant_id].jobs -= 1
                usage[request.tenant_id].gpus -= request.gpus
                result.makespan_s = max(result.makespan_s, t)
        result.peak_queue = max(result.peak_queue, len(queue))
        started = plan(queue.values(), nodes, free, usage=usage, policies=policies, now=t, reserve_after=reserve_after_s)
        for placement in started.placements:
            request = placement.job
            for index, gpus in placement.nodes:
                free[index] -= gpus
            busy += request.gpus
            tenant_usage = usage.setdefault(request.tenant_id, Usage())
            tenant_usage.jobs += 1
            tenant_usage.gpus += request.gpus
            del queue[request.job_id]
            job = result.jobs[request.job_id]
            result.waits_s[job.job_id] = t - job.submit_s
            heapq.heappush(events, (t + job.duration_s, 0, "finish", (request, placement.nodes)))
    result.never_started = sorted(queue)
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def format_report(result: SimResult, cluster: Cluster, *, price_per_gpu_hour: float) -> str:
    waits_h = [w / HOUR for w in result.waits_s.values()]
    shape = {}
    for node in cluster.nodes:
        shape[node.gpus] = shape.get(node.gpus, 0) + 1
    layout = " + ".join(f"{n} x {g}" for g, n in sorted(shape.items(), reverse=True))
    lines = [
        f"tuneforge simulate: {len(result.jobs)} jobs over {result.window_s / DAY:.0f} days on {cluster.gpus} GPUs "
        f"({layout} {cluster.nodes[0].gpu_type} nodes), {len({j.tenant for j in result.jobs.values()})} tenants",
        f"queue wait (h): p50 {percentile(waits_h, 50):.2f}  p95 {percentile(waits_h, 95):.2f}  "
        f"max {max(waits_h, default=0):.2f}   (peak queue {result.peak_queue} jobs)",
    ]
    for size_class in dict.fromkeys(j.size_class for j in sorted(result.jobs.values(), key=lambda j: j.gpus)):
        own = [result.waits_s[j.job_id] / HOUR for j in result.jobs.values() if j.size_class == size_class and j.job_id in result.waits_s]
        lines.append(f"  {size_class:>7}: {len(own):4d} jobs  wait p50 {percentile(own, 50):6.2f}  p95 {percentile(own, 95):6.2f}")
    for tenant in sorted({j.tenant for j in result.jobs.values()}):
        own = [result.waits_s[j.job_id] / HOUR for j in result.jobs.values() if j.tenant == tenant and j.job_id in result.waits_s]
        lines.append(f"  {tenant:>8}: {len(own):4d} jobs  wait p50 {percentile(own, 50):6.2f}  p95 {percentile(own, 95):6.2f}")
    capacity_h = cluster.gpus * result.window_s / HOUR
    busy_h = result.busy_gpu_s_in_window / HOUR
    demand_h = result.demand_gpu_s / HOUR
    lines += [
        f"GPU utilization over the month: {busy_h / capacity_h:.1%} ({busy_h:,.0f} of {capacity_h:,.0f} GPU-h); "
        f"demand {demand_h:,.0f} GPU-h ({demand_h / capacity_h:.1%} of capacity); last job done on day "
        f"{result.makespan_s / DAY:.1f}",
        f"cost at ${price_per_gpu_hour:.2f}/GPU-h: cluster ${capacity_h * price_per_gpu_hour:,.0f}/month, "
        f"jobs ${demand_h * price_per_gpu_hour:,.0f} (${demand_h * price_per_gpu_hour / max(1, len(result.jobs)):,.0f} per job), "
        f"idle ${(capacity_h - busy_h) * price_per_gpu_hour:,.0f}",
    ]
    if result.never_started:
        lines.append(f"never started: {len(result.never_started)} jobs (they fit on no node)")
    return "\n".join(lines)
