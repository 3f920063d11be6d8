"""Optional metric reporters (`monitoring.reporters`): TensorBoard, MLflow and Weights & Biases, fed from
the same metrics events the job writes to events.jsonl, so every tool sees the numbers the API serves.

Each writes into the job directory: tensorboard/ (event files), mlflow.db + mlruns/ (MLflow's SQLite store
and artifacts), wandb/ (offline runs; `wandb sync` uploads them later). A reporter whose package is missing is a SpecError at
start-up, before any training; the API refuses such a job earlier still, from the workers' report.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from pathlib import Path
from typing import Any

from tuneforge.engine.events import EventReporter
from tuneforge.spec.loader import SpecError
from tuneforge.spec.monitoring import REPORTER_MODULES

TENSORBOARD_DIR, MLFLOW_DB, MLFLOW_DIR, WANDB_DIR = "tensorboard", "mlflow.db", "mlruns", "wandb"
# Metrics events carry bookkeeping next to the numbers; these are not series.
_NOT_SERIES = {"step", "total_steps", "example_ids", "epoch_step"}


def missing_reporters(names: list[str]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(REPORTER_MODULES[name]) is None]


class TensorBoardReporter:
    def __init__(self, job_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(job_dir / TENSORBOARD_DIR))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class MlflowReporter:
    def __init__(self, job_dir: Path, run_name: str, config: dict):
        from mlflow.tracking import MlflowClient

        # MLflow 3 keeps its file store in maintenance mode; a SQLite file in the job directory is its local store.
        job_dir = Path(job_dir).resolve()
        self.client = MlflowClient(tracking_uri=f"sqlite:///{job_dir / MLFLOW_DB}")
        experiment = self.client.get_experiment_by_name("tuneforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            "tuneforge", artifact_location=(job_dir / MLFLOW_DIR).as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in config.items():
            self.client.log_param(self.run_id, key, value)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbReporter:
    def __init__(self, job_dir: Path, run_name: str, config: dict, *, mode: str):
        import wandb

        (job_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.run = wandb.init(mode=mode, dir=str(job_dir), project="tuneforge", name=run_name, config=config,
                              reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporters(spec, job_dir: Path) -> list[Any]:
    """The reporters the spec asks for, opened in the job directory; SpecError names a missing package."""
    names = list(spec.monitoring.reporters)
    if missing := missing_reporters(names):
        raise SpecError(f"monitoring.reporters: {', '.join(missing)} needs the {', '.join(REPORTER_MODULES[m] for m in missing)} "
                        "package on the machine that runs the recipe (pip install 'tuneforge[reporters]'); remove it "
                        "from monitoring.reporters or install it")
    run_name, config = Path(job_dir).name, _flat_config(spec)
    opened = []
    for name in names:
        if name == "tensorboard":
            opened.append(TensorBoardReporter(job_dir, run_name, config))
        elif name == "mlflow":
            opened.append(MlflowReporter(job_dir, run_name, config))
        else:
            opened.append(WandbReporter(job_dir, run_name, config, mode=spec.monitoring.wandb_mode))
    return opened


def _flat_config(spec) -> dict[str, Any]:
    """The hyperparameters a run is compared by (a few sections, flattened as section.field)."""
    dumped = spec.model_dump(mode="json", include={"method", "model", "adapter", "training"})
    flat: dict[str, Any] = {"method": dumped.pop("method")}
    for section, fields in dumped.items():
        for key, value in fields.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                flat[f"{section}.{key}"] = value
    return flat


class ReportingEvents(EventReporter):
    """The job's event log that also hands each metrics event's numbers to the open reporters."""

    def __init__(self, job_dir: str | Path, *, enabled: bool = True):
        super().__init__(job_dir, enabled=enabled)
        self.reporters: list[Any] = []
        self._lock = threading.Lock()  # the system sampler and the loop may both write

    def attach(self, reporters: list[Any]) -> None:
        self.reporters = reporters

    def emit(self, message: str, *, type: str = "message", level: str = "info", **data: Any) -> dict:
        event = super().emit(message, type=type, level=level, **data)
        if self.reporters and type == "metrics" and isinstance(data.get("step"), int):
            numbers = {k: float(v) for k, v in data.items() if k not in _NOT_SERIES and isinstance(v, (int, float))
                       and not isinstance(v, bool) and math.isfinite(v)}
            with self._lock:
                for reporter in self.reporters:
                    reporter.log(numbers, data["step"])
        return event

    def close(self) -> None:
        with self._lock:
            reporters, self.reporters = self.reporters, []
        for reporter in reporters:
            reporter.close()
