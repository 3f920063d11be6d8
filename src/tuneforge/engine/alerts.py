"""The recipe's own alerts (`monitoring.alerts`): loss NaN or diverging, throughput dropped, an evaluation
metric worse K times in a row. Each alert is an event when it starts firing and when it clears; one with
`stop_job` makes the loop checkpoint and end the job with AlertStop (bad input for the exit code: a restart
would only reproduce it). No progress is the worker's check, since a hung recipe cannot report itself.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable

from tuneforge.spec.monitoring import AlertsSpec, alert_event


SMOOTHING = 0.9  # of the loss's exponential moving average (the divergence check)


class AlertStop(Exception):
    """Raised by the training loop after the checkpoint an alert with stop_job asked for."""


class AlertMonitor:
    """Watches each step's loss and tokens/s and each evaluation; `stop_reason` is set by an alert that stops."""

    def __init__(self, alerts: AlertsSpec, emit: Callable[..., object]):
        self.spec, self.emit = alerts, emit
        self.firing: set[str] = set()
        self.stop_reason: str | None = None
        self.steps = 0
        self.smoothed: float | None = None  # the loss's moving average: one noisy batch is not a divergence
        self.min_smoothed = math.inf
        self.speeds: deque[float] = deque(maxlen=alerts.throughput_drop.window)
        self.last_eval: float | None = None
        self.worse_in_a_row = 0

    def observe_step(self, step: int, loss: float, tokens_per_second: float) -> None:
        spec = self.spec
        self.steps += 1
        if spec.loss_nan.enabled:
            self._state("loss_nan", not math.isfinite(loss), spec.loss_nan.stop_job, step,
                        f"train_loss is {loss} at step {step}", train_loss=None if not math.isfinite(loss) else loss)
        if not math.isfinite(loss):
            return
        divergence = spec.loss_divergence
        self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
        if divergence.enabled and self.steps > divergence.after_steps and self.min_smoothed > 0:
            limit = divergence.factor * self.min_smoothed
            self._state("loss_divergence", self.smoothed > limit, divergence.stop_job, step,
                        f"train_loss (moving average {self.smoothed:.4g}) at step {step} is above {divergence.factor:g} x "
                        f"its running minimum {self.min_smoothed:.4g}", train_loss=loss, smoothed_loss=self.smoothed,
                        running_min=self.min_smoothed)
        self.min_smoothed = min(self.min_smoothed, self.smoothed)
        drop = spec.throughput_drop
        if drop.enabled and math.isfinite(tokens_per_second):
            if len(self.speeds) == drop.window:
                median = statistics.median(self.speeds)
                self._state("throughput_drop", tokens_per_second < drop.fraction * median, drop.stop_job, step,
                            f"tokens/s {tokens_per_second:.4g} at step {step} is below {drop.fraction:g} x its running "
                            f"median {median:.4g}", tokens_per_second=tokens_per_second, running_median=median)
            self.speeds.append(tokens_per_second)

    def observe_eval(self, step: int, metrics: dict[str, float]) -> None:
        worse = self.spec.eval_worse
        if not worse.enabled or not isinstance(value := metrics.get(worse.metric), (int, float)):
            return
        if self.last_eval is not None:
            got_worse = value > self.last_eval if worse.direction == "min" else value < self.last_eval
            self.worse_in_a_row = self.worse_in_a_row + 1 if got_worse else 0
        self.last_eval = value
        self._state("eval_worse", self.worse_in_a_row >= worse.evaluations, worse.stop_job, step,
                    f"valid_{worse.metric} got worse {self.worse_in_a_row} evaluations in a row (now {value:.4g} at "
                    f"step {step}): the model may be overfitting", metric=f"valid_{worse.metric}", value=value,
                    evaluations=self.worse_in_a_row)

    def _state(self, name: str, now_firing: bool, stop_job: bool, step: int, message: str, **values) -> None:
        """An event when an alert starts firing (and the stop it asks for), and one when it clears."""
        if now_firing and name not in self.firing:
            self.firing.add(name)
            stops = " (monitoring.alerts stop_job: the job stops at this step's checkpoint)" if stop_job else ""
            self.emit(f"alert {name}: {message}{stops}", level="warning",
                      **alert_event(name, stop_job=stop_job, step=step, state="firing", **values))
            if stop_job and self.stop_reason is None:
                self.stop_reason = f"alert {name}: {message}"
        elif not now_firing and name in self.firing:
            self.firing.discard(name)
            self.emit(f"alert {name} cleared at step {step}", **alert_event(name, stop_job=stop_job, step=step,
                                                                            state="resolved"))
