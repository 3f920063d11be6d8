"""Background loops stop on request: a loop stuck in a call that never returns cannot keep the process alive."""

from __future__ import annotations

import threading
import time

from tuneforge.scheduler.loop import run_loops, run_until_stopped


class Ticker:
    def __init__(self):
        self.ticks = 0

    def run(self, stop: threading.Event) -> None:
        run_until_stopped(self.tick, interval=0.01, stop=stop)

    def tick(self) -> None:
        self.ticks += 1


class Stuck:
    def __init__(self):
        self.release = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self.release.wait()  # e.g. a database call that never answers


def test_a_stop_returns_within_the_grace_even_when_a_loop_is_stuck():
    stop, ticker, stuck = threading.Event(), Ticker(), Stuck()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    run_loops([ticker, stuck], stop=stop, grace_s=0.5)
    assert time.monotonic() - started < 3.0
    assert ticker.ticks > 0
    stuck.release.set()
