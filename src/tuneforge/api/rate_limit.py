"""Request rate per API key: a token bucket that every API process shares, through the database (one
atomic upsert per request, db/quotas.py) or, where TUNEFORGE_REDIS_URL is set, through Redis (one Lua
script per request, atomic on the Redis server). A request over the rate is a 429 with Retry-After.

The bucket holds up to `burst` requests (at most a minute's worth) and refills at the key's rate: the
tenant's requests_per_minute, or TUNEFORGE_RATE_LIMIT_PER_MINUTE.

Requests without a valid key (missing, malformed, wrong, revoked, expired: every 401) spend the same kind
of bucket, one per client address (AddressLimit): once it is empty, that address is answered 429 before
any key it sends is looked up, so guessing keys is bounded by TUNEFORGE_UNAUTHENTICATED_RATE_LIMIT_PER_MINUTE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Protocol

import anyio

from tuneforge.api.errors import ApiError
from tuneforge.db import quotas
from tuneforge.db.quotas import Spend
from tuneforge.db.session import Database
from tuneforge.settings import Settings

log = logging.getLogger("tuneforge.api.rate_limit")


class TokenBuckets(Protocol):
    def take(self, key_id: str, *, per_second: float, capacity: float) -> Spend: ...

    def peek(self, key_id: str, *, per_second: float, capacity: float) -> Spend: ...


class DatabaseBuckets:
    def __init__(self, db: Database):
        self.db = db

    def take(self, key_id: str, *, per_second: float, capacity: float) -> Spend:
        with self.db.session() as session:
            return quotas.take_token(session, key_id=key_id, now_s=time.time(), per_second=per_second, capacity=capacity)

    def peek(self, key_id: str, *, per_second: float, capacity: float) -> Spend:
        with self.db.read_session() as session:
            return quotas.peek_token(session, key_id=key_id, now_s=time.time(), per_second=per_second, capacity=capacity)


# The same arithmetic as db/quotas.take_token: spend one token; a refusal leaves the bucket one below
# what it held, and the next refill gives that token back.
_REDIS_TAKE = """
local now, rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(held[1]), tonumber(held[2])
if tokens == nil then tokens, at = cap, now end
if tokens < 0 then tokens = tokens + 1 end
tokens = math.min(cap, tokens + math.max(0, now - at) * rate) - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(math.max(at, now)))
redis.call('EXPIRE', KEYS[1], math.ceil(cap / rate) + 60)
return tostring(tokens)
"""
# The same refill without spending or writing: what _REDIS_TAKE would leave.
_REDIS_PEEK = """
local now, rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(held[1]), tonumber(held[2])
if tokens == nil then return tostring(cap - 1) end
if tokens < 0 then tokens = tokens + 1 end
return tostring(math.min(cap, tokens + math.max(0, now - at) * rate) - 1)
"""


class RedisBuckets:
    def __init__(self, url: str):
        import redis  # the optional extra tuneforge[redis]

        self.client = redis.Redis.from_url(url, socket_timeout=2.0)
        self.script = self.client.register_script(_REDIS_TAKE)
        self.peek_script = self.client.register_script(_REDIS_PEEK)

    def take(self, key_id: str, *, per_second: float, capacity: float) -> Spend:
        return self._spend(self.script, key_id, per_second, capacity)

    def peek(self, key_id: str, *, per_second: float, capacity: float) -> Spend:
        return self._spend(self.peek_script, key_id, per_second, capacity)

    def _spend(self, script, key_id: str, per_second: float, capacity: float) -> Spend:
        tokens = float(script(keys=[f"tuneforge:rate:{key_id}"], args=[time.time(), per_second, capacity]))
        if tokens >= 0:
            return Spend(True, 0.0)
        return Spend(False, -tokens / per_second)


class RateLimiter:
    """Spends one request of a key's bucket, or raises the 429."""

    def __init__(self, buckets: TokenBuckets, *, default_per_minute: int, burst: int,
                 unauthenticated_per_minute: int = 60, unauthenticated_burst: int = 30):
        self.buckets, self.default_per_minute, self.burst = buckets, default_per_minute, burst
        self.unauthenticated_per_minute, self.unauthenticated_burst = unauthenticated_per_minute, unauthenticated_burst

    @classmethod
    def for_settings(cls, settings: Settings, db: Database) -> RateLimiter:
        buckets = RedisBuckets(settings.redis_url) if settings.redis_url else DatabaseBuckets(db)
        return cls(buckets, default_per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst,
                   unauthenticated_per_minute=settings.unauthenticated_rate_limit_per_minute,
                   unauthenticated_burst=settings.unauthenticated_rate_limit_burst)

    def _address_bucket(self) -> dict:
        rate = self.unauthenticated_per_minute
        return {"per_second": rate / 60.0, "capacity": float(max(1, min(self.unauthenticated_burst, rate)))}

    def address_spend(self, address: str, *, spend: bool) -> Spend:
        """The address's bucket of requests without a valid key: spent (a 401 was answered) or looked at."""
        bucket = address_bucket(address)
        if spend:
            return self.buckets.take(bucket, **self._address_bucket())
        return self.buckets.peek(bucket, **self._address_bucket())

    def check(self, key_id: str, *, per_minute: int | None) -> None:
        rate = per_minute or self.default_per_minute
        spend = self.buckets.take(key_id, per_second=rate / 60.0, capacity=float(max(1, min(self.burst, rate))))
        if not spend.allowed:
            wait = max(1, math.ceil(spend.retry_after))
            raise ApiError(429, f"this API key is over its rate of {rate} requests per minute; retry in {wait} s",
                           code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": str(wait)})


def address_bucket(address: str) -> str:
    """The bucket id of a client address (hashed: an IPv6 address is longer than the column holds)."""
    return "ip_" + hashlib.sha256(address.encode()).hexdigest()[:32]


class AddressLimit:
    """ASGI middleware: every 401 spends a token of the client address's bucket, and an address whose bucket
    is empty gets a 429 with Retry-After before its key is looked up (and without a write), unless that key
    is one this process already knows to be valid (so a client behind the same address as a key guesser
    keeps working). TUNEFORGE_UNAUTHENTICATED_RATE_LIMIT_PER_MINUTE=0 turns it off."""

    def __init__(self, app, *, limiter: RateLimiter, key_cache):
        self.app, self.limiter, self.key_cache = app, limiter, key_cache

    async def __call__(self, scope, receive, send):
        # Only the API answers 401 (health, the OpenAPI document and the dashboard's files need no key).
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or self.limiter.unauthenticated_per_minute <= 0:
            return await self.app(scope, receive, send)
        client = scope.get("client")
        address = client[0] if client else "unknown"
        if not self._known_key(scope):
            held = await anyio.to_thread.run_sync(lambda: self.limiter.address_spend(address, spend=False))
            if not held.allowed:
                return await self._refuse(send, held.retry_after)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] == 401:
                try:
                    await anyio.to_thread.run_sync(lambda: self.limiter.address_spend(address, spend=True))
                except Exception:  # noqa: BLE001 - the 401 still goes out; say loudly what was not counted
                    log.exception("could not count a request without a valid key from %s", address)
            await send(message)

        await self.app(scope, receive, counting_send)

    def _known_key(self, scope) -> bool:
        from tuneforge.db.tenants import hash_key

        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, secret = header.partition(" ")
        return scheme.lower() == "bearer" and bool(secret.strip()) and \
            self.key_cache.get(hash_key(secret.strip())) is not None

    async def _refuse(self, send, retry_after: float) -> None:
        wait = max(1, math.ceil(retry_after))
        body = json.dumps({"error": {
            "message": f"too many requests without a valid API key from this address "
                       f"(at most {self.limiter.unauthenticated_per_minute} per minute); retry in {wait} s",
            "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(wait).encode())]})
        await send({"type": "http.response.body", "body": body})
