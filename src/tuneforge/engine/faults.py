"""Deterministic fault injection for the resilience tests, set by the host, never by a job spec.

TUNEFORGE_FAULT_INJECTION is a comma-separated list of:
  crash_at_step=N        raise an error when step N has finished (a crash that repeats on every attempt)
  kill_at_step=N         SIGKILL this process when step N has finished, before any checkpoint of step N
  kill_in_checkpoint=N   SIGKILL this process while checkpoint N is half written (before its manifest)
  oom_above_micro_batch=N  raise torch.OutOfMemoryError for any micro-batch of more than N examples
  rank=N                 only the process of that distributed rank (RANK) gets the faults above
  restart=N              only the run after N crash restarts (TUNEFORGE_RESTART) gets them: a crash that
                         happens once, so the restarted run resumes and succeeds
Unset, every hook is a no-op costing one dict lookup.
"""

from __future__ import annotations

import os
import signal


def _parse(text: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        faults[name] = int(value)
    return faults


def _for_this_process(faults: dict[str, int]) -> dict[str, int]:
    if "rank" in faults and faults["rank"] != int(os.environ.get("RANK", "0")):
        return {}
    if "restart" in faults and faults["restart"] != int(os.environ.get("TUNEFORGE_RESTART", "0")):
        return {}
    return faults


FAULTS = _for_this_process(_parse(os.environ.get("TUNEFORGE_FAULT_INJECTION", "")))


class InjectedCrash(RuntimeError):
    """The error `crash_at_step` raises, standing in for a bug or a bad batch."""


def after_step(step: int) -> None:
    if FAULTS.get("kill_at_step") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if FAULTS.get("crash_at_step") == step:
        raise InjectedCrash(f"injected crash after step {step}")


def inside_checkpoint(step: int) -> None:
    if FAULTS.get("kill_in_checkpoint") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def before_micro_batch(size: int) -> None:
    limit = FAULTS.get("oom_above_micro_batch")
    if limit is not None and size > limit:
        import torch

        raise torch.OutOfMemoryError(f"injected out of memory for a micro-batch of {size} (limit {limit})")
