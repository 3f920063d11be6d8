"""The job's event log, DIR/events.jsonl: one JSON object per line, shaped like an OpenAI fine-tuning event.

{"object": "fine_tuning.job.event", "id": "ftevent-...", "created_at": 1732812345, "level": "info",
 "type": "message" | "metrics", "message": "...", "data": {"kind": "progress", ...}}

`data.kind` says what a message event is about (status, progress, eval, checkpoint, summary, ...);
metrics events carry step, train_loss, learning_rate and tokens_per_second. The log is append-only and
each event is a single write, so a scheduler tailing the file never reads half an event.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


class EventReporter:
    """Appends events to a job directory's events.jsonl (only one process per job writes)."""

    def __init__(self, job_dir: str | Path, *, enabled: bool = True):
        self.path = Path(job_dir) / EVENTS_FILE
        self.enabled = enabled

    def emit(self, message: str, *, type: str = "message", level: str = "info", **data: Any) -> dict:
        event = {
            "object": "fine_tuning.job.event",
            "id": f"ftevent-{uuid.uuid4().hex[:24]}",
            "created_at": int(time.time()),
            "level": level,
            "type": type,
            "message": message,
            "data": data,
        }
        if self.enabled:
            line = (json.dumps(event, default=_jsonable) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return event

    def metrics(self, message: str, **data: Any) -> dict:
        return self.emit(message, type="metrics", **data)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_events(job_dir: str | Path) -> Iterator[dict]:
    """Every complete event in a job directory (a torn last line is skipped, not an error)."""
    path = Path(job_dir) / EVENTS_FILE
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n"):
                yield json.loads(line)
