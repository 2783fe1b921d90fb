"""One API key's budget shared by every relayd that uses it, kept in Redis.

The same model as relayd/budget.py (a slot is held from the send until `window` after the answer;
a token bucket paces the sends), plus a 429 block seen by one instance that holds for all and a
fair share between instances. Every decision is one Lua script, so it is atomic, and every time
is Redis's own clock (`TIME`), so the instances' clocks may differ by any amount.

Redis losing its data (a restart without persistence, FLUSHALL, a failover to an empty replica)
forgets the slots taken before: the first acquire that finds no `epoch` key closes the key for
`window + lease` ("settling after a reset"), the rule relayd follows locally after a crash. A fresh
Redis looks the same, so the very first use of a key waits one window (plus the lease) as well,
and so does a key unused for the epoch's 7-day lifetime.

The client should be created with short `socket_connect_timeout` and `socket_timeout` (say 1 s):
every method raises `SharedBudgetUnavailable` when Redis is unreachable or answers an error, and
the caller (relayd/budget_shared.py) then sends nothing on the key until Redis answers again.
Import this module only when `shared_budget` is set: redis-py is an optional extra.
"""

from __future__ import annotations

import re
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from relayd.budget import BURST_SHARE
from relayd.budget_grants import Denied, Grant, check_limits
from relayd.errors import SharedBudgetUnavailable

EPOCH_TTL = 7 * 24 * 3600  # seconds the reset marker outlives the key's last use
KEY_PARTS = ("slots", "seq", "bucket", "blocked", "hungry", "epoch", "seen")

# Common to every script. KEYS are always the seven KEY_PARTS, in order; `ttl` is in ms.
_PRELUDE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local K_slots, K_seq, K_bucket, K_blocked = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_hungry, K_epoch, K_seen = KEYS[5], KEYS[6], KEYS[7]

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- numbers go to Redis as text with microseconds: Lua's own conversion keeps 14 digits only
local function f(x) return string.format('%.6f', x) end

local function expire(now, ttl)
  for _, k in ipairs({K_slots, K_seq, K_bucket, K_hungry, K_seen}) do
    redis.call('PEXPIRE', k, ttl)
  end
  local untl = tonumber(redis.call('HGET', K_blocked, 'until'))
  if untl then
    redis.call('PEXPIRE', K_blocked, math.max(ttl, math.ceil((untl - now) * 1000) + 1000))
  end
end

-- nobody sends before `untl`; a later block wins, an earlier one changes nothing
local function block(now, untl, reason)
  local old = tonumber(redis.call('HGET', K_blocked, 'until'))
  if not old or untl > old then
    redis.call('HSET', K_blocked, 'until', f(untl), 'reason', reason)
  end
end
"""

# ARGV: instance, limit, window, lease, burst, ttl, epoch_ttl
# Returns {1, slot} or {0, wait (seconds, as text), reason}.
_ACQUIRE = """
local instance = ARGV[1]
local limit, window, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local burst, ttl, epoch_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rate = limit / window
local grace = math.max(2 * window / limit, 0.05)
local now = clock()

if redis.call('EXISTS', K_epoch) == 0 then
  redis.call('SET', K_epoch, f(now), 'PX', epoch_ttl)
  block(now, now + window + lease, 'settling after a reset')
else
  redis.call('PEXPIRE', K_epoch, epoch_ttl)
end
redis.call('ZADD', K_seen, f(now), instance)
redis.call('ZREMRANGEBYSCORE', K_seen, '-inf', '(' .. f(now - window))
redis.call('ZREMRANGEBYSCORE', K_hungry, '-inf', f(now))

-- a denied instance is hungry until a little after it will ask again
local function deny(wait, reason)
  wait = math.max(wait, 0.001)
  local mark = now + wait + grace
  local old = tonumber(redis.call('ZSCORE', K_hungry, instance))
  if not old or mark > old then redis.call('ZADD', K_hungry, f(mark), instance) end
  expire(now, ttl)
  return {0, f(wait), reason}
end

local b = redis.call('HMGET', K_blocked, 'until', 'reason')
local untl = tonumber(b[1])
if untl and now < untl then return deny(untl - now, b[2]) end

-- the bucket earns limit/window tokens a second up to `burst`, but beyond one token only while
-- the rolling window has room for them (as relayd/budget.py): walk the slots freed since `at`
local bk = redis.call('HMGET', K_bucket, 'tokens', 'at')
local tokens, at = tonumber(bk[1]), tonumber(bk[2])
if not tokens or not at then tokens, at = burst, now end
if at > now then at = now end -- failed over to a host whose clock is behind
redis.call('ZREMRANGEBYSCORE', K_slots, '-inf', f(at))
local held = redis.call('ZCARD', K_slots)
local frees = redis.call('ZRANGEBYSCORE', K_slots, '-inf', f(now), 'WITHSCORES')
local t, i = at, 2
while true do
  local stop = now
  if i <= #frees then stop = math.min(tonumber(frees[i]), now) end
  local cap = math.min(burst, math.max(1, limit - held + 1))
  tokens = math.max(tokens, math.min(cap, tokens + (stop - t) * rate))
  if i > #frees then break end
  t, held, i = stop, held - 1, i + 2
end
redis.call('ZREMRANGEBYSCORE', K_slots, '-inf', f(now))
held = redis.call('ZCARD', K_slots)

local function save() redis.call('HSET', K_bucket, 'tokens', f(tokens), 'at', f(now)) end

local token_wait = math.max(0, (1 - tokens) / rate)
if held >= limit then
  -- an in-flight slot may be answered any moment and then frees a window later
  local first = redis.call('ZRANGE', K_slots, 0, 0, 'WITHSCORES')
  save()
  return deny(math.max(math.min(tonumber(first[2]) - now, window), token_wait), 'budget')
end
if tokens < 1 - 1e-9 then
  save()
  return deny(token_wait, 'pacing')
end

-- fair share: the slot goes to a hungry instance that holds fewer slots than this one
local hungry = redis.call('ZRANGE', K_hungry, 0, -1)
if #hungry > 1 or (#hungry == 1 and hungry[1] ~= instance) then
  local counts = {}
  for _, m in ipairs(redis.call('ZRANGE', K_slots, 0, -1)) do
    local owner = string.match(m, '^(.*)|[^|]*$')
    counts[owner] = (counts[owner] or 0) + 1
  end
  local mine = counts[instance] or 0
  for _, other in ipairs(hungry) do
    if other ~= instance and (counts[other] or 0) < mine then
      save()
      return deny(window / limit / 2, 'fair share')
    end
  end
end

tokens = tokens - 1
save()
local slot = instance .. '|' .. redis.call('INCR', K_seq)
redis.call('ZADD', K_slots, f(now + lease + window), slot)
redis.call('ZREM', K_hungry, instance)
expire(now, ttl)
return {1, slot}
"""

# ARGV: slot, window, ttl. A slot still held (not expired) frees a window from now.
_RELEASE = """
local slot, window, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock()
local score = tonumber(redis.call('ZSCORE', K_slots, slot))
if score and score > now then redis.call('ZADD', K_slots, 'XX', f(now + window), slot) end
expire(now, ttl)
return 1
"""

# ARGV: slot, burst, ttl. The slot goes and its token comes back.
_UNUSED = """
local slot, burst, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock()
if redis.call('ZREM', K_slots, slot) == 1 then
  local tokens = tonumber(redis.call('HGET', K_bucket, 'tokens'))
  if tokens then redis.call('HSET', K_bucket, 'tokens', f(math.min(burst, tokens + 1))) end
end
expire(now, ttl)
return 1
"""

# ARGV: seconds, reason, ttl
_BLOCK = """
local now = clock()
block(now, now + tonumber(ARGV[1]), 'blocked: ' .. ARGV[2])
expire(now, tonumber(ARGV[3]))
return 1
"""

# ARGV: instance, window. Reads only.
_SNAPSHOT = """
local instance, window = ARGV[1], tonumber(ARGV[2])
local now = clock()
local members = redis.call('ZRANGEBYSCORE', K_slots, '(' .. f(now), '+inf')
local mine, prefix = 0, instance .. '|'
for _, m in ipairs(members) do
  if string.sub(m, 1, #prefix) == prefix then mine = mine + 1 end
end
local b = redis.call('HMGET', K_blocked, 'until', 'reason')
local blocked_for = math.max(0, (tonumber(b[1]) or now) - now)
return {
  #members, mine, f(blocked_for), blocked_for > 0 and b[2] or '',
  redis.call('ZRANGEBYSCORE', K_seen, f(now - window), '+inf'),
  redis.call('ZRANGEBYSCORE', K_hungry, '(' .. f(now), '+inf'),
  redis.call('EXISTS', K_epoch),
}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_HASH = re.compile(r"[0-9a-f]{64}")


class SharedBudget:
    """The budget of the API key whose sha256 is `api_key_hash`, as seen by `instance`."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        api_key_hash: str,
        *,
        limit: int,
        window: float,
        lease: float,
        instance: str,
        burst: int | None = None,
    ) -> None:
        if not _HASH.fullmatch(api_key_hash):
            raise ValueError("api_key_hash must be the sha256 hex digest of the key, not the key")
        check_limits(limit, window, lease)
        if not instance or "|" in instance:
            raise ValueError("instance must be non-empty and must not contain '|'")
        self.limit = limit
        self.window = window
        self.lease = lease
        self.instance = instance
        self.burst = burst if burst is not None else max(2, int(limit * BURST_SHARE))
        self.keys = [f"relayd:budget:{{{api_key_hash}}}:{part}" for part in KEY_PARTS]
        self._ttl_ms = int(max(window + lease, 60.0) * 10 * 1000)
        self._acquire = client.register_script(_PRELUDE + _ACQUIRE)
        self._release = client.register_script(_PRELUDE + _RELEASE)
        self._unused = client.register_script(_PRELUDE + _UNUSED)
        self._block = client.register_script(_PRELUDE + _BLOCK)
        self._snapshot = client.register_script(_PRELUDE + _SNAPSHOT)

    async def _run(self, script: Any, *args: Any) -> Any:
        try:
            return await script(keys=self.keys, args=args)
        except (RedisError, OSError) as exc:
            raise SharedBudgetUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def acquire(self) -> Grant | Denied:
        """One slot for a request about to be sent, or how long to wait before asking again."""
        answer = await self._run(
            self._acquire,
            self.instance,
            self.limit,
            self.window,
            self.lease,
            self.burst,
            self._ttl_ms,
            EPOCH_TTL * 1000,
        )
        if int(answer[0]) == 1:
            return Grant(_text(answer[1]))
        return Denied(float(_text(answer[1])), _text(answer[2]))

    async def release(self, slot: str) -> None:
        """The answer arrived (or we gave up): the slot frees `window` from now."""
        await self._run(self._release, slot, self.window, self._ttl_ms)

    async def unused(self, slot: str) -> None:
        """Granted but no request went out: the slot and its pacing token come back at once."""
        await self._run(self._unused, slot, self.burst, self._ttl_ms)

    async def block(self, seconds: float, reason: str) -> None:
        """A 429: nobody on this key sends for `seconds` (a longer block already set stays)."""
        await self._run(self._block, max(0.0, seconds), reason, self._ttl_ms)

    async def snapshot(self) -> dict[str, Any]:
        """The shared state for status output; changes nothing. `used`: slots held on the key
        now (`mine`: by this instance); `blocked_for`: seconds left of a block (`block_reason`);
        `instances`: those that asked in the last window; `hungry`: those waiting for a slot;
        `epoch`: False until the first acquire after Redis started empty."""
        raw = await self._run(self._snapshot, self.instance, self.window)
        return {
            "used": int(raw[0]),
            "mine": int(raw[1]),
            "limit": self.limit,
            "blocked_for": float(_text(raw[2])),
            "block_reason": _text(raw[3]),
            "instances": sorted(_text(i) for i in raw[4]),
            "hungry": sorted(_text(i) for i in raw[5]),
            "epoch": bool(int(raw[6])),
        }
