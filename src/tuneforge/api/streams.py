"""Live event streams without a thread each: one poller per process asks, with one query, which watched jobs
have new events or have finished and wakes just those streams; open streams are capped per API key."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tuneforge.api.errors import ApiError
from tuneforge.db import job_events as event_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db.session import Database
from tuneforge.db.tables import JobEvent
from tuneforge.spec.api import TERMINAL_STATUSES

log = logging.getLogger("tuneforge.api.streams")

# Stream reads share Starlette's thread pool with every sync route; a few at a time leaves it to them.
STREAM_READ_THREADS = 4
HEADS_PER_QUERY = 500  # well under SQLite's bound-parameter limit
POLL_SECONDS = 0.5  # how late a stream may learn of a new event


@dataclass(eq=False)
class Subscription:
    """One open stream: the job it follows and the last event seq it has sent."""

    job_id: str
    seq: int
    wake: anyio.Event = field(default_factory=anyio.Event)

    async def wait(self, timeout: float) -> bool:
        """True when the poller saw something new for this stream, False after `timeout` seconds."""
        with anyio.move_on_after(timeout):
            await self.wake.wait()
        woken = self.wake.is_set()
        self.wake = anyio.Event()
        return woken


class EventStreams:
    """The process's open event streams: per-key slots, subscriptions, and the poller that wakes them."""

    def __init__(self, db: Database, *, max_per_key: int, poll_seconds: float = POLL_SECONDS):
        self.db, self.max_per_key, self.poll_seconds = db, max_per_key, poll_seconds
        self.read_limiter = anyio.CapacityLimiter(STREAM_READ_THREADS)
        self._slots_lock = threading.Lock()  # slots are claimed in sync routes (threads), freed on the loop
        self._slots: Counter[str] = Counter()
        self._subscriptions: set[Subscription] = set()  # touched only on the event loop
        self._poller: asyncio.Task | None = None

    def claim_slot(self, key_id: str) -> Callable[[], None]:
        """Take one of the key's stream slots, or answer 429; returns the (idempotent) release."""
        with self._slots_lock:
            if self._slots[key_id] >= self.max_per_key:
                raise ApiError(429, f"this API key already has {self.max_per_key} open event streams; close one "
                                    "or raise TUNEFORGE_MAX_STREAMS_PER_KEY", code="too_many_streams",
                               type="rate_limit_error")
            self._slots[key_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._slots_lock:
                if not released:
                    released = True
                    self._slots[key_id] -= 1
                    if not self._slots[key_id]:
                        del self._slots[key_id]

        return release

    def open_streams(self, key_id: str) -> int:
        with self._slots_lock:
            return self._slots[key_id]

    @property
    def subscriptions(self) -> int:
        return len(self._subscriptions)

    @property
    def polling(self) -> bool:
        return self._poller is not None

    def subscribe(self, job_id: str, seq: int) -> Subscription:
        """Call on the event loop; starts the poller if this is the only stream."""
        subscription = Subscription(job_id, seq)
        self._subscriptions.add(subscription)
        loop = asyncio.get_running_loop()
        # A poller left behind by a closed loop (an app served by more than one, as test clients do) is dead.
        if self._poller is None or self._poller.get_loop() is not loop:
            self._poller = loop.create_task(self._run())
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    async def read(self, job_id: str, *, after_seq: int, limit: int) -> tuple[list[JobEvent], str | None]:
        """A stream's events after `after_seq`, oldest first, and the job's status, read off the event loop."""
        return await anyio.to_thread.run_sync(self._read_events, job_id, after_seq, limit, limiter=self.read_limiter)

    def _read_events(self, job_id: str, after_seq: int, limit: int) -> tuple[list[JobEvent], str | None]:
        with self.db.read_session() as session:
            rows = event_rows.events_since(session, job_id=job_id, after_seq=after_seq, limit=limit)
            job = job_rows.get_job_any_tenant(session, job_id=job_id)
            return rows, job.status if job else None

    async def run_once(self) -> int:
        """One poll: read the heads of every watched job, wake the streams behind them; returns how many woke."""
        job_ids = sorted({s.job_id for s in self._subscriptions})
        heads = await anyio.to_thread.run_sync(self._read_heads, job_ids, limiter=self.read_limiter)
        woken = 0
        for subscription in list(self._subscriptions):
            head = heads.get(subscription.job_id)
            if head and (head[0] > subscription.seq or head[1] in TERMINAL_STATUSES):
                subscription.wake.set()
                woken += 1
        return woken

    def _read_heads(self, job_ids: list[str]) -> dict[str, tuple[int, str]]:
        heads: dict[str, tuple[int, str]] = {}
        with self.db.read_session() as session:
            for start in range(0, len(job_ids), HEADS_PER_QUERY):
                heads.update(event_rows.job_heads(session, job_ids=job_ids[start:start + HEADS_PER_QUERY]))
        return heads

    async def _run(self) -> None:
        # Lives while any stream is open; the check and the reset happen with no await between them, so a
        # stream that subscribes meanwhile either is seen here or starts a new poller.
        try:
            while self._subscriptions:
                try:
                    await self.run_once()
                except Exception:  # noqa: BLE001 - a database hiccup must not end every stream; they keep alive
                    log.exception("event stream poll failed; retrying")
                await asyncio.sleep(self.poll_seconds)
        finally:
            if self._poller is asyncio.current_task():
                self._poller = None


class SlotStreamingResponse(StreamingResponse):
    """A StreamingResponse that frees its stream slot however the stream ends: done, disconnect or error,
    including a client that leaves before the first byte (when the body's own `finally` never runs)."""

    def __init__(self, content, *, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
