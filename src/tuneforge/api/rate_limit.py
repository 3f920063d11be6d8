"""Request rate per API key: a token bucket that every API process shares, through the database (one
atomic upsert per request, db/quotas.py) or, where TUNEFORGE_REDIS_URL is set, through Redis (one Lua
script per request, atomic on the Redis server). A request over the rate is a 429 with Retry-After.

The bucket holds up to `burst` requests (at most a minute's worth) and refills at the key's rate: the
tenant's requests_per_minute, or TUNEFORGE_RATE_LIMIT_PER_MINUTE.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from tuneforge.api.errors import ApiError
from tuneforge.db import quotas
from tuneforge.db.quotas import Spend
from tuneforge.db.session import Database
from tuneforge.settings import Settings


class TokenBuckets(Protocol):
    def take(self, key_id: str, *, per_second: float, capacity: float) -> Spend: ...


class DatabaseBuckets:
    def __init__(self, db: Database):
        self.db = db

    def take(self, key_id: str, *, per_second: float, capacity: float) -> Spend:
        with self.db.session() as session:
            return quotas.take_token(session, key_id=key_id, now_s=time.time(), per_second=per_second, capacity=capacity)


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


class RedisBuckets:
    def __init__(self, url: str):
        import redis  # the optional extra tuneforge[redis]

        self.client = redis.Redis.from_url(url, socket_timeout=2.0)
        self.script = self.client.register_script(_REDIS_TAKE)

    def take(self, key_id: str, *, per_second: float, capacity: float) -> Spend:
        tokens = float(self.script(keys=[f"tuneforge:rate:{key_id}"], args=[time.time(), per_second, capacity]))
        if tokens >= 0:
            return Spend(True, 0.0)
        return Spend(False, -tokens / per_second)


class RateLimiter:
    """Spends one request of a key's bucket, or raises the 429."""

    def __init__(self, buckets: TokenBuckets, *, default_per_minute: int, burst: int):
        self.buckets, self.default_per_minute, self.burst = buckets, default_per_minute, burst

    @classmethod
    def for_settings(cls, settings: Settings, db: Database) -> RateLimiter:
        buckets = RedisBuckets(settings.redis_url) if settings.redis_url else DatabaseBuckets(db)
        return cls(buckets, default_per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst)

    def check(self, key_id: str, *, per_minute: int | None) -> None:
        rate = per_minute or self.default_per_minute
        spend = self.buckets.take(key_id, per_second=rate / 60.0, capacity=float(max(1, min(self.burst, rate))))
        if not spend.allowed:
            wait = max(1, math.ceil(spend.retry_after))
            raise ApiError(429, f"this API key is over its rate of {rate} requests per minute; retry in {wait} s",
                           code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": str(wait)})
