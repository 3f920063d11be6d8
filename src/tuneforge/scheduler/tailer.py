"""Follow a job's events.jsonl from a byte offset, returning only complete lines (the recipe writes each
event with one append, so a partial line is an event still being written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_READ = 4 << 20  # per call; a long backlog is taken in several bites


def read_new_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """(events after offset, the offset just past the last complete line)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(MAX_READ)
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in chunk[: end + 1].splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue  # not an event; the recipe only writes whole JSON lines, so this is foreign text
        if isinstance(value, dict):
            events.append(value)
    return events, offset + end + 1
