"""Per-target rate limits and concurrency caps, global across every worker process (Redis, atomic Lua).

- ``RateLimiter``: at most ``count`` requests per target in any rolling ``period``. ``acquire`` lets ``n``
  through or says how long to wait.
- ``ConcurrencySlots``: at most ``limit`` holders per target; a holder's slot expires after its TTL, so a
  killed worker cannot leak one.

Both read the clock of Redis (``TIME``), never the workers', so skewed hosts share one notion of now.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import redis

from orchestrator.renewals import renewals


class RateLike(Protocol):
    @property
    def count(self) -> float: ...

    @property
    def period(self) -> float: ...


# The requests of the last ``period`` are members of a sorted set scored by when they were let through (ms,
# Redis clock): a request goes while fewer than ``count`` went in that window. That is how targets state and
# count their limits (HubSpot: 190 in any rolling 10 s), so a target's figure holds at its full rate. (A
# token bucket lets a burst go on top of its rate, which had to come off the figure: the CRM's 190 became
# 170.) A request of more than ``count`` goes once the window is empty, and its entries beyond ``count`` are
# dated ahead, a window's share each: the debt keeps the long-run rate.
_WINDOW = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
local need = math.min(n, limit)
if used + need > limit then
  local k = used + need - limit - 1
  local leaving = redis.call('ZRANGE', KEYS[1], k, k, 'WITHSCORES')
  return string.format('%.6f', (tonumber(leaving[2]) + window - now) / 1000)
end
local last = now
for i = 1, n do
  last = now + math.max(0, i - limit) * window / limit
  redis.call('ZADD', KEYS[1], string.format('%.3f', last), ARGV[4] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], math.ceil(last - now + window) + 1000)
return '0'
"""

# Holders are members of a sorted set scored by their expiry (ms, Redis clock); expired ones are dropped
# before counting. ARGV[3] already holding a slot refreshes it instead of taking a second one.
_ACQUIRE = """
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not held and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return 1
"""

_REFRESH = """
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return 1
"""

_HELD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class RateLimiter:
    """A rolling-window limit per target in Redis, shared by every process that uses the same key prefix."""

    def __init__(self, client: redis.Redis, key_prefix: str = "idhub:rate") -> None:
        self._redis = client
        self._prefix = key_prefix
        self._script = client.register_script(_WINDOW)

    def acquire(self, target: str, rate: RateLike | float, n: int = 1) -> float:
        """Let ``n`` requests through and return 0, or none and return how many seconds to wait.

        ``rate`` is a ``Rate`` (``count`` per ``period`` seconds) or requests per second.
        """
        count, period = (float(rate), 1.0) if isinstance(rate, int | float) else (rate.count, rate.period)
        if 0 < count < 1:  # 0.5/s is one request in any 2 s
            count, period = 1.0, period / count
        if count <= 0 or period <= 0 or n < 1:
            raise ValueError("a rate must be positive, and n at least 1")
        args: list[str | int | float] = [int(count), period * 1000, n, uuid.uuid4().hex]
        return float(self._script(keys=[f"{self._prefix}:{target}"], args=args))

    def wait(self, target: str, rate: RateLike | float, n: int = 1, *, timeout: float | None = None) -> bool:
        """Block until ``n`` requests are let through (True), or until ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            delay = self.acquire(target, rate, n)
            if delay <= 0:
                return True
            if deadline is not None and time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)


def admit(
    limiter: RateLimiter, target: str, rate: RateLike, ids: Sequence[str], per_call: int
) -> tuple[list[str], float]:
    """The ids a delivery may push now under the target's rate limit, and 0; or none and the seconds to wait.

    A target limits requests (HubSpot: 190 per 10 s), and one request carries up to ``per_call`` records where
    the target takes batches: the limit counts requests, and a delivery takes no more than it allows at once.
    """
    batch = list(ids[: max(1, int(rate.count)) * per_call])
    wait = limiter.acquire(target, rate, -(-len(batch) // per_call))
    return (batch, 0.0) if wait <= 0 else ([], wait)


class SlotUnavailable(RuntimeError):
    """Every concurrency slot of the target was held for as long as the caller would wait."""


class ConcurrencySlots:
    """At most ``limit`` concurrent holders per target, across all workers; slots expire after their TTL."""

    def __init__(self, client: redis.Redis, key_prefix: str = "idhub:slots") -> None:
        self._prefix = key_prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)
        self._held = client.register_script(_HELD)
        self._redis = client

    def _key(self, target: str) -> str:
        return f"{self._prefix}:{target}"

    def acquire(self, target: str, limit: int, ttl: float, token: str | None = None) -> str | None:
        """A holder token when a slot was free (held for ``ttl`` seconds), else None."""
        token = token or uuid.uuid4().hex
        taken = self._acquire(keys=[self._key(target)], args=[limit, max(1, int(ttl * 1000)), token])
        return token if int(taken) else None

    def refresh(self, target: str, token: str, ttl: float) -> bool:
        """Extend a held slot by ``ttl`` seconds from now; False when it had already expired."""
        return bool(int(self._refresh(keys=[self._key(target)], args=[max(1, int(ttl * 1000)), token])))

    def release(self, target: str, token: str) -> None:
        """Give a slot back (a no-op when it had expired)."""
        self._redis.zrem(self._key(target), token)

    def held(self, target: str) -> int:
        """How many slots of ``target`` are held right now."""
        return int(self._held(keys=[self._key(target)]))

    @contextmanager
    def slot(
        self, target: str, limit: int, ttl: float, *, wait: float = 0.0, poll: float = 0.05
    ) -> Iterator[str]:
        """Hold a slot for the ``with`` block, waiting up to ``wait`` seconds; SlotUnavailable otherwise.

        The slot is refreshed every third of ``ttl`` while the block runs, so a long block keeps it and a
        worker killed inside it frees it within ``ttl``: keep ``ttl`` short.
        """
        deadline = time.monotonic() + wait
        while (token := self.acquire(target, limit, ttl)) is None:
            if time.monotonic() >= deadline:
                raise SlotUnavailable(f"all {limit} slots of target {target} are busy")
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

        def keep() -> None:
            with contextlib.suppress(redis.RedisError):  # Redis away a moment: the next beat tries again
                self.refresh(target, token, ttl)

        try:
            with renewals.every(ttl / 3, keep):
                yield token
        finally:
            self.release(target, token)


__all__ = ["ConcurrencySlots", "RateLike", "RateLimiter", "SlotUnavailable"]
