"""Public object ids in the OpenAI style: a prefix that says what the object is, then 24 random hex digits."""

from __future__ import annotations

import secrets
import time

FILE, JOB, EVENT, CHECKPOINT, API_KEY = "file-", "ftjob-", "ftevent-", "ftckpt_", "key_"


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    """Unix seconds, as every created_at / finished_at in the API."""
    return int(time.time())
