"""Where the quota counters live: in this process (`MemoryStore`) or in a Redis or Valkey server every replica
shares (`RedisStore`, redis-py's asyncio client). Both do the same two steps, each atomic:

- `admit`: drop the reservations that expired (a replica died holding them), then check every counter of the
  exchange (a budget: spent + held by exchanges in flight, below its limit; a rate: the minute's count below its
  limit); only if all pass, reserve `amount` micro-dollars on every budget counter under the exchange's id and
  count the request on every `requests` counter. One Lua script, one round trip.
- `settle`: give the reservation back and add what the exchange cost (micro-dollars) and its tokens. One script.

Amounts are integers (micro-dollars, tokens): a shared sum never drifts. A budget counter is one hash
(`spent`, `held`, `r:<id>` per reservation) with a sorted set `<key>:r` of reservation expiries (milliseconds);
a rate counter is one integer. Every key expires on its own past its window (policy/quotas.key_ttl).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from llm_gateway.policy.quotas import Counter

SWEEP_STEP = 256  # expired counters forgotten per admission at most: a burst of expiries is spread out


class Verdict(NamedTuple):
    """What `admit` found: `refused` is the index of the first counter at its limit (None: admitted and
    reserved); `levels` the level of each counter before this exchange (micro-dollars spent + held, or the
    count), as far as checked; `spent` and `held` of the refusing counter."""

    refused: int | None
    levels: tuple[int, ...]
    spent: int = 0
    held: int = 0


class StoreError(Exception):
    """The store could not be reached or answered wrongly."""


@dataclass
class _Budget:
    spent: int = 0
    held: int = 0
    reservations: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (micro-dollars, expiry)
    expiries: list[tuple[float, str]] = field(default_factory=list)  # a heap of (expiry, id), settled ones left in
    expires: float | None = None


class MemoryStore:
    """One process's counters (`quotas.store: memory`, and the local count while a shared store is down)."""

    name = "memory"

    def __init__(self) -> None:
        self.budgets: dict[str, _Budget] = {}
        self.counts: dict[str, list] = {}  # key -> [count, expiry]
        self._expiring: list[tuple[float, str, str]] = []  # a heap of (expiry, "b" | "c", key): what to forget when

    def _sweep(self, now: float) -> None:
        """Forget counters whose window is over (a day past it, policy/quotas.key_ttl), from a heap of their
        expiries: only the expired are looked at, at most SWEEP_STEP per admission. (A scan of every counter once
        a minute stalled the event loop for about 0.4 s with 100 000 sessions, and every daily counter of a day
        expires at the same instant.) `total` counters have no expiry: they stay for the process's life."""
        expiring = self._expiring
        for _ in range(SWEEP_STEP):
            if not expiring or expiring[0][0] >= now:
                return
            expiry, table, key = heapq.heappop(expiring)
            entries = self.budgets if table == "b" else self.counts
            entry = entries.get(key)
            if entry is not None and (entry.expires if table == "b" else entry[1]) == expiry:  # not made again since
                del entries[key]

    def _budget(self, c: Counter, now: float) -> _Budget:
        b = self.budgets.get(c.key)
        if b is None:
            b = self.budgets[c.key] = _Budget(expires=now + c.ttl if c.ttl else None)
            if b.expires is not None:
                heapq.heappush(self._expiring, (b.expires, "b", c.key))
        expiries = b.expiries
        while expiries and expiries[0][0] <= now:  # reservations in expiry order: only the expired are looked at
            _, rid = heapq.heappop(expiries)
            held = b.reservations.pop(rid, None)
            if held is not None:
                b.held -= held[0]
        return b

    async def admit(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float, now: float | None = None) -> Verdict:
        return self.admit_now(counters, rid, amount, ttl, now)

    def admit_now(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float, now: float | None = None) -> Verdict:
        """`admit` without a coroutine: the addon calls the memory store directly."""
        now = time.time() if now is None else now
        self._sweep(now)
        levels = []
        for i, c in enumerate(counters):
            if c.kind == "usd":
                b = self._budget(c, now)
                if b.spent + b.held >= c.limit:
                    return Verdict(i, tuple(levels), b.spent, b.held)
                levels.append(b.spent + b.held)
            else:
                n = self.counts.get(c.key, [0])[0]
                if n >= c.limit:
                    return Verdict(i, tuple(levels), n, 0)
                levels.append(n)
        for c in counters:
            if c.kind == "usd":
                b = self.budgets[c.key]
                b.reservations[rid] = (amount, now + ttl)
                heapq.heappush(b.expiries, (now + ttl, rid))
                if len(b.expiries) > 2 * len(b.reservations) + 64:  # mostly settled entries: rebuilt from the live
                    b.expiries = [(exp, r) for r, (_, exp) in b.reservations.items()]
                    heapq.heapify(b.expiries)
                b.held += amount
            elif c.kind == "requests":
                self._count(c, 1, now)
        return Verdict(None, tuple(levels))

    def _count(self, c: Counter, n: int, now: float) -> None:
        entry = self.counts.get(c.key)
        if entry is None:
            entry = self.counts[c.key] = [0, now + c.ttl if c.ttl else None]
            if entry[1] is not None:
                heapq.heappush(self._expiring, (entry[1], "c", c.key))
        entry[0] += n

    async def settle(self, counters: Sequence[Counter], rid: str, cost: int, input_tokens: int, output_tokens: int,
                     now: float | None = None) -> None:
        self.settle_now(counters, rid, cost, input_tokens, output_tokens, now)

    def settle_now(self, counters: Sequence[Counter], rid: str, cost: int, input_tokens: int, output_tokens: int,
                   now: float | None = None) -> None:
        now = time.time() if now is None else now
        for c in counters:
            if c.kind == "usd":
                b = self._budget(c, now)
                held = b.reservations.pop(rid, None)  # its heap entry goes when it comes up
                if held is not None:
                    b.held -= held[0]
                b.spent += cost
            elif c.kind == "input_tokens" and input_tokens:
                self._count(c, input_tokens, now)
            elif c.kind == "output_tokens" and output_tokens:
                self._count(c, output_tokens, now)

    async def level(self, counter: Counter, now: float | None = None) -> tuple[int, int]:
        """(spent, held) of a budget counter, or (count, 0) of a rate counter."""
        now = time.time() if now is None else now
        if counter.kind == "usd":
            b = self.budgets.get(counter.key)
            return (0, 0) if b is None else (b.spent, b.held)
        return self.counts.get(counter.key, [0])[0], 0

    async def close(self) -> None:
        pass


# KEYS: the counters. ARGV: now (ms), reservation id, reservation expiry (ms), amount (micro-dollars), then per
# key: kind (usd | requests | input_tokens | output_tokens), limit, key ttl (s; 0: none).
# Returns {0, level…} when admitted, else {index (1-based), level…, spent, held}.
ADMIT = """
local now, rid, expiry, amount = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local levels = {}
for i, key in ipairs(KEYS) do
  local kind, limit = ARGV[2 + i * 3], tonumber(ARGV[3 + i * 3])
  if kind == 'usd' then
    local gone = redis.call('ZRANGEBYSCORE', key .. ':r', '-inf', now)
    for _, id in ipairs(gone) do
      local held = redis.call('HGET', key, 'r:' .. id)
      if held then
        redis.call('HINCRBY', key, 'held', -tonumber(held))
        redis.call('HDEL', key, 'r:' .. id)
      end
    end
    if #gone > 0 then redis.call('ZREMRANGEBYSCORE', key .. ':r', '-inf', now) end
    local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
    local held = tonumber(redis.call('HGET', key, 'held') or '0')
    if spent + held >= limit then
      table.insert(levels, 1, i)
      table.insert(levels, spent)
      table.insert(levels, held)
      return levels
    end
    table.insert(levels, spent + held)
  else
    local count = tonumber(redis.call('GET', key) or '0')
    if count >= limit then
      table.insert(levels, 1, i)
      table.insert(levels, count)
      table.insert(levels, 0)
      return levels
    end
    table.insert(levels, count)
  end
end
for i, key in ipairs(KEYS) do
  local kind, ttl = ARGV[2 + i * 3], tonumber(ARGV[4 + i * 3])
  if kind == 'usd' then
    redis.call('HSET', key, 'r:' .. rid, amount)
    redis.call('HINCRBY', key, 'held', amount)
    redis.call('ZADD', key .. ':r', expiry, rid)
    if ttl > 0 then
      redis.call('EXPIRE', key, ttl)
      redis.call('EXPIRE', key .. ':r', ttl)
    end
  elseif kind == 'requests' then
    redis.call('INCR', key)
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
table.insert(levels, 1, 0)
return levels
"""

# KEYS: the counters. ARGV: reservation id, cost (micro-dollars), then per key: kind, amount to add, key ttl (s).
SETTLE = """
local rid = ARGV[1]
for i, key in ipairs(KEYS) do
  local kind, add, ttl = ARGV[i * 3], tonumber(ARGV[1 + i * 3]), tonumber(ARGV[2 + i * 3])
  if kind == 'usd' then
    local held = redis.call('HGET', key, 'r:' .. rid)
    if held then
      redis.call('HINCRBY', key, 'held', -tonumber(held))
      redis.call('HDEL', key, 'r:' .. rid)
      redis.call('ZREM', key .. ':r', rid)
    end
    redis.call('HINCRBY', key, 'spent', add)
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  elseif add > 0 then
    redis.call('INCRBY', key, add)
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
return 1
"""


class RedisStore:
    """Counters every replica shares, in Redis or Valkey (`quotas.store: redis://host:port/db`, `rediss://` for
    TLS; a Redis Cluster with `quotas.cluster: true`, the URL naming any node). Each step is one Lua script (EVALSHA, loaded again after a server restart), so a check and its
    reservation are one atomic step whatever the number of replicas. Errors become `StoreError`."""

    name = "redis"

    def __init__(self, url: str, password: str | None = None, timeout: float = 1.0, client=None,
                 cluster: bool = False) -> None:
        if client is None:
            from redis.asyncio import Redis, RedisCluster
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries inside the client: an admission waits at most `timeout` on a store that is down, then
            # the rules' on_store_error decides; the next admission tries again.
            options = dict(password=password, socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=Retry(NoBackoff(), 0))
            if cluster:  # every key of a script carries the one hash tag: one slot, one node per script
                client = RedisCluster.from_url(url, **options)
            else:
                client = Redis.from_url(url, health_check_interval=30, **options)
        self.client = client
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)

    async def admit(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float, now: float | None = None) -> Verdict:
        if not counters:
            return Verdict(None, ())
        now = time.time() if now is None else now
        args: list = [int(now * 1000), rid, int((now + ttl) * 1000), amount]
        for c in counters:
            args += [c.kind, c.limit, c.ttl]
        try:
            found = await self._admit(keys=[c.key for c in counters], args=args)
        except Exception as e:  # noqa: BLE001 - redis-py's connection, timeout, response and script errors alike
            raise StoreError(f"{type(e).__name__}: {e}") from None
        found = [int(x) for x in found]
        if found[0] == 0:
            return Verdict(None, tuple(found[1:]))
        return Verdict(found[0] - 1, tuple(found[1:-2]), found[-2], found[-1])

    async def settle(self, counters: Sequence[Counter], rid: str, cost: int, input_tokens: int, output_tokens: int,
                     now: float | None = None) -> None:
        keys, args = [], [rid, cost]
        for c in counters:
            add = {"usd": cost, "input_tokens": input_tokens, "output_tokens": output_tokens}.get(c.kind, 0)
            if c.kind == "requests" or (c.kind != "usd" and not add):
                continue
            keys.append(c.key)
            args += [c.kind, add, c.ttl]
        if not keys:
            return
        try:
            await self._settle(keys=keys, args=args)
        except Exception as e:  # noqa: BLE001 - as in admit
            raise StoreError(f"{type(e).__name__}: {e}") from None

    async def level(self, counter: Counter, now: float | None = None) -> tuple[int, int]:
        try:
            if counter.kind == "usd":
                spent, held = await self.client.hmget(counter.key, ["spent", "held"])
                return int(spent or 0), int(held or 0)
            return int(await self.client.get(counter.key) or 0), 0
        except Exception as e:  # noqa: BLE001 - as in admit
            raise StoreError(f"{type(e).__name__}: {e}") from None

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a client whose server is gone
            pass
