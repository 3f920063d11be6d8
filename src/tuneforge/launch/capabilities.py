"""What a worker's environment can run, reported by the worker and checked at submission.

Whether DeepSpeed is installed is a property of the machines that run recipes, not of the API host:
the worker reports its strategies with its inventory, `POST /jobs` refuses a strategy no live worker
offers, and a worker claims only jobs whose strategy it offers. Stdlib only (no torch import).
"""

from __future__ import annotations

import importlib.util

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def host_strategies() -> list[str]:
    """The strategies this Python environment can run: ddp and fsdp with torch, deepspeed when installed."""
    if importlib.util.find_spec("torch") is None:
        return []
    return ["ddp", "fsdp"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") is not None else [])


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
