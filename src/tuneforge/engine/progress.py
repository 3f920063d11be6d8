"""The terminal view of a training run: a progress bar on a TTY, a line every few steps otherwise."""

from __future__ import annotations

import os
import sys
import time


def process_age() -> float | None:
    """Seconds since this process started (Linux), so start-up time counts the interpreter and imports."""
    try:
        with open("/proc/self/stat") as handle:
            started_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


class ProgressDisplay:
    def __init__(self, *, enabled: bool = True):
        self.total = 0
        self.enabled = enabled
        self.bar = None
        self._last_line = 0.0

    def start(self, total_steps: int, initial_step: int = 0) -> None:
        """Begin the training phase: a bar on a terminal, periodic lines elsewhere."""
        self.total = total_steps
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", desc="train", dynamic_ncols=True)

    def update(self, step: int, *, loss: float, learning_rate: float, tokens_per_second: float, eta_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.monotonic()
        if now - self._last_line >= 10 or step == self.total:
            self._last_line = now
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {learning_rate:.2e}  "
                f"{tokens_per_second:.0f} tok/s  eta {eta_s:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
