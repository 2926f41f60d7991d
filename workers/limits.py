"""Per-target rate limits and concurrency caps, global across every worker process (Redis, atomic Lua).

- ``RateLimiter``: a token bucket per target. ``acquire`` takes ``n`` tokens or says how long to wait.
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
    def per_second(self) -> float: ...

    @property
    def burst(self) -> float: ...


# Tokens refill continuously at ``rate`` per second up to ``burst``. A request for more than the burst (a
# big batch) waits for a full bucket, then goes and leaves a debt, so the long-run rate still holds.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local need = math.min(n, burst)
local wait = 0
if tokens >= need then
  tokens = tokens - n
else
  wait = (need - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - math.min(tokens, 0)) / rate * 1000) + 1000)
return string.format('%.6f', wait)
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
    """A token bucket per target in Redis, shared by every process that uses the same key prefix."""

    def __init__(self, client: redis.Redis, key_prefix: str = "idhub:rate") -> None:
        self._redis = client
        self._prefix = key_prefix
        self._script = client.register_script(_BUCKET)

    def acquire(self, target: str, rate: RateLike | float, n: int = 1, burst: float | None = None) -> float:
        """Take ``n`` tokens and return 0, or take nothing and return the seconds to wait before trying again.

        ``rate`` is a ``Rate`` (its ``per_second`` and ``burst``) or tokens per second (burst: one second's
        worth, at least one); ``burst`` overrides either.
        """
        if isinstance(rate, int | float):
            per_second, default_burst = float(rate), max(1.0, float(rate))
        else:
            per_second, default_burst = rate.per_second, rate.burst
        if per_second <= 0 or n < 1:
            raise ValueError("rate must be positive and n at least 1")
        size = default_burst if burst is None else burst
        wait = self._script(keys=[f"{self._prefix}:{target}"], args=[per_second, size, n])
        return float(wait)

    def wait(self, target: str, rate: RateLike | float, n: int = 1, *, timeout: float | None = None) -> bool:
        """Block until ``n`` tokens are taken (True), or until ``timeout`` seconds have passed (False)."""
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
    the target takes batches: a token per request, and at most a burst's worth of requests at once.
    """
    batch = list(ids[: max(1, int(rate.burst)) * per_call])
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
