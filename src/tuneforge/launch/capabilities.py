"""What a worker's environment can run, reported by the worker and checked at submission.

Whether DeepSpeed is installed is a property of the machines that run recipes, not of the API host:
the worker reports its strategies with its inventory, `POST /jobs` refuses a strategy no live worker
offers, and a worker claims only jobs whose strategy it offers. The same goes for the metric reporters
of `monitoring.reporters` (TensorBoard, MLflow, W&B packages). Stdlib only (no torch import).
"""

from __future__ import annotations

import importlib.util

from tuneforge.spec.monitoring import REPORTER_MODULES, REPORTERS

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def host_strategies() -> list[str]:
    """The strategies this Python environment can run: ddp and fsdp with torch, deepspeed when installed."""
    if importlib.util.find_spec("torch") is None:
        return []
    return ["ddp", "fsdp"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") is not None else [])


def host_reporters() -> list[str]:
    """The monitoring.reporters whose package this Python environment has."""
    return [name for name in REPORTERS if importlib.util.find_spec(REPORTER_MODULES[name]) is not None]


def offered_reporters(node: dict) -> list[str] | None:
    """The reporters a reported node offers; None for a worker from before workers reported them."""
    reporters = node.get("reporters")
    return None if reporters is None else list(reporters)


def parse_strategies(value: str, *, variable: str) -> list[str]:
    """A comma-separated list of strategies from configuration; unknown names are an error."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown:
        raise ValueError(f"{variable}: unknown strategies {', '.join(unknown)}; expected some of {', '.join(STRATEGIES)}")
    return names


def offered(node: dict) -> list[str] | None:
    """The strategies a reported node offers; None for a worker from before workers reported them."""
    strategies = node.get("strategies")
    return None if strategies is None else list(strategies)


def reporter_problem(wanted: list[str], inventories: list[dict]) -> str | None:
    """Why no live worker can run a job with these monitoring.reporters; None when one can, when none are
    wanted, when no worker is known yet, or when a worker does not say (it predates the report)."""
    reports = [offered_reporters(node) for inventory in inventories for node in inventory["nodes"]]
    if not wanted or not reports or any(report is None for report in reports):
        return None
    if any(set(wanted) <= set(report) for report in reports):
        return None
    missing = sorted({name for name in wanted if not any(name in report for report in reports)})
    packages = ", ".join(REPORTER_MODULES[name] for name in missing) or "all of them on one worker"
    return (f"monitoring.reporters {', '.join(wanted)}: no live worker has {packages} installed (pip install "
            f"'tuneforge[reporters]' where the recipes run); the workers offer "
            f"{', '.join(sorted({r for report in reports for r in report})) or 'none'}")
