"""The `monitoring:` section of a JobSpec: system sampling, the MFU peak, reporters and alerts.

Alerts are events of kind `alert` (`alert_event`) whichever side raises them: the recipe for what it
measures (loss, throughput, evaluations), the worker for a job that stopped reporting steps.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Reporter = Literal["tensorboard", "mlflow", "wandb"]
REPORTERS: tuple[str, ...] = Reporter.__args__
# The module each reporter needs on the machine that runs the recipe (launch/capabilities.py reports them).
REPORTER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
AlertName = Literal["loss_nan", "loss_divergence", "throughput_drop", "no_progress", "eval_worse"]
ALERT_KIND = "alert"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Alert(_Part):
    enabled: bool = Field(True, description="Watch for this alert.")
    stop_job: bool = Field(False, description="Also stop the job: it checkpoints at the next step boundary and "
                           "fails with the alert as its error (not retried).")


class LossNanAlert(_Alert):
    """The training loss is NaN or infinite."""


class LossDivergenceAlert(_Alert):
    factor: float = Field(4.0, gt=1.0, le=1e6, description="Fire when the loss (its moving average, 0.9) exceeds "
                          "factor x its running minimum.")
    after_steps: int = Field(10, ge=1, le=1_000_000, description="Steps before the check starts (early losses swing).")


class ThroughputDropAlert(_Alert):
    enabled: bool = Field(False, description="Watch for this alert (off by default: shared machines vary).")
    fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Fire when tokens/s falls below this fraction of its "
                            "running median.")
    window: int = Field(20, ge=3, le=10_000, description="Steps in the running median (the check starts once full).")


class NoProgressAlert(_Alert):
    minutes: float = Field(60.0, gt=0.0, le=525_600, description="Fire when no optimizer step was reported for this "
                           "long (the worker checks it: a hung recipe cannot report itself).")


class EvalWorseAlert(_Alert):
    enabled: bool = Field(False, description="Watch for this alert (off by default: validation is optional).")
    metric: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")] = Field(
        "loss", description="Validation metric watched (as in the eval events, without valid_), e.g. loss.")
    direction: Literal["min", "max"] = Field("min", description="min: lower is better (loss); max: higher is better.")
    evaluations: int = Field(3, ge=1, le=1000, description="Fire after this many evaluations in a row each worse than "
                             "the one before (overfitting).")


class AlertsSpec(_Part):
    loss_nan: LossNanAlert = Field(default_factory=LossNanAlert, description="Loss NaN or infinite (on by default).")
    loss_divergence: LossDivergenceAlert = Field(
        default_factory=LossDivergenceAlert, description="Loss far above its running minimum (on by default).")
    throughput_drop: ThroughputDropAlert = Field(
        default_factory=ThroughputDropAlert, description="Tokens/s far below its running median (off by default).")
    no_progress: NoProgressAlert = Field(
        default_factory=NoProgressAlert, description="No step reported for N minutes (on by default).")
    eval_worse: EvalWorseAlert = Field(
        default_factory=EvalWorseAlert, description="A validation metric worse K evaluations in a row (off by "
        "default).")


class MonitoringSpec(_Part):
    sample_interval_s: float | None = Field(
        10.0, ge=0.5, le=3600, description="Seconds between system samples (GPU utilization, memory and power "
        "through NVML; CPU % and RSS without a GPU), written as metrics events; null: no sampling.")
    peak_flops: float | None = Field(
        None, gt=0, le=1e18, description="Peak FLOP/s of one device for the MFU estimate; default: the GPU's "
        "datasheet peak (planner/hardware.py). A CPU has none, so MFU is reported on a CPU only with this set.")
    reporters: Annotated[list[Reporter], Field(max_length=len(REPORTERS))] = Field(
        default_factory=list, description="Also log metrics to tensorboard, mlflow (a file store in the job "
        "directory) and/or wandb; the worker must have the package installed.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="wandb: offline writes the run into the job directory (no network); online "
        "needs WANDB_API_KEY on the worker.")
    alerts: AlertsSpec = Field(default_factory=AlertsSpec, description="Alerts raised as events, optionally "
                               "stopping the job.")


def alert_event(name: str, *, stop_job: bool, step: int | None, **values: Any) -> dict[str, Any]:
    """The data of an alert event (kind `alert`), the same from the recipe and from the worker."""
    return {"kind": ALERT_KIND, "alert": name, "stop_job": stop_job, "step": step, **values}
