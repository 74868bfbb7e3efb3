"""The limiter's Lua scripts and the layout of their keys: what runs inside Redis, kept
apart from the Python that decides which limits apply (``limiter.py``).

``ADMIT`` is table-driven: its fixed slots (concurrency leases, the token budget and its
reservations, the idempotency record) come first, then one row per window limit, each a
counter key with its limit, the amount this request adds (1 or its tokens) and the
window's span (a sliding minute of one-second buckets, or the calendar month its key
names). A new window limit is therefore one more row, made from a ``Window`` on a
``Limits`` field: the script itself does not change. ``SETTLE`` replaces the tokens
reserved in the token-counting windows and the budget by the actual count; ``RENEW``
extends a long request's leases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Protocol, get_args, get_type_hints

from redis.exceptions import NoScriptError

WINDOW_S = 60  # a sliding window's span
PERIOD = 0  # a window's span for "the calendar month (UTC) its key names"

# ADMIT's fixed keys, in this order, before the window counters; SETTLE and RENEW take
# the same six first.
FIXED_KEYS = ("conc", "user_conc", "budget", "res_exp", "res_cost", "idem")
CONC, USER_CONC, BUDGET, RES_EXP, RES_COST, IDEMPOTENCY = range(len(FIXED_KEYS))


@dataclass(frozen=True)
class Window:
    """A limit counted over a window of time: one row of ``ADMIT``'s table. Put on a
    ``Limits`` field (``Annotated``) to make that field a window limit."""

    name: str  # the refusal's ``limit``: "requests", "user_tokens", "monthly_calls"
    key: str  # the counter's key, under the tenant's (or end user's) prefix
    what: str  # for people: "requests per minute"
    tokens: bool = False  # counts the request's tokens (settled to the actual), else 1
    per_user: bool = False  # per end user, when the request names one
    span_s: int = WINDOW_S  # a sliding window of this many seconds, or PERIOD
    refusal: str = "rate_limited"  # the 429's code
    header: str | None = None  # OpenAI's x-ratelimit-*-<header>, if it has them


def windows_of(kind: type) -> tuple[tuple[str, Window], ...]:
    """The window limits of a ``Limits`` dataclass: (field name, its ``Window``), in
    field order (the order ``ADMIT`` checks them)."""
    hints = get_type_hints(kind, include_extras=True)
    return tuple((f.name, w) for f in fields(kind)
                 for w in get_args(hints[f.name])[1:] if isinstance(w, Window))


class WindowRow(NamedTuple):
    """A row of ADMIT's table for one request: a window limit that applies, its limit
    and its counter's key."""

    window: Window
    limit: int
    key: str


# KEYS: 1 tenant leases, 2 end user leases, 3 budget, 4 reservation expiries,
#       5 reservation costs, 6 idempotency record (read only with a body hash),
#       6+i the counter of window limit i
# ARGV: 1 now_ms, 2 cost, 3 lease id, 4 lease ttl ms, 5 concurrency, 6 user concurrency,
#       7 budget (-1 = none for these three), 8 ttl s of the period's counters,
#       9 the request body's hash ('' = no request id),
#       then per window limit i: 3i+7 limit, 3i+8 amount, 3i+9 span s (0 = PERIOD)
# Returns {0, then per window: remaining, reset s}
#      or {code, retry after s, which}: 1 a window limit (which = its row i),
#         2 concurrency_limited, 3 budget_exhausted, 9 budget counter missing (load it,
#         then retry), 4 the request id was used with another body, 5 its first request
#         still runs; or {6, the first request's stored result}.
ADMIT = """
local idem, hash = KEYS[6], ARGV[9]
if hash ~= '' then  -- a seen request id is answered before any limit: it generates nothing
  local seen = redis.call('HMGET', idem, 'h', 'r')
  if seen[1] then
    if seen[1] ~= hash then return {4, 0, 'idempotency'} end
    if not seen[2] then
      return {5, math.max(1, math.ceil(redis.call('PTTL', idem) / 1000)), 'idempotency'}
    end
    return {6, seen[2]}
  end
end
local now_ms = tonumber(ARGV[1])
local now = math.floor(now_ms / 1000)
local cost = tonumber(ARGV[2])
local lease = ARGV[3]
local expiry = now_ms + tonumber(ARGV[4])
local conc, uconc, budget = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local period_ttl = tonumber(ARGV[8])

-- A sliding window is a hash of one-second buckets plus three fields: 't' their total,
-- 'o' the oldest bucket held, 'n' the newest. Buckets leave as 'o' passes the window's
-- start, each second visited once in the window's life: no call sums the whole window.
-- Returns the total, seconds until the oldest bucket leaves, and 'o' and 'n' after
-- trimming (nil for an empty window), which window_add then starts from. A period's
-- counter (span 0) is a plain number under a key named by its period.
local function window_sum(key, span)
  if span == 0 then return tonumber(redis.call('GET', key) or '0'), 0, nil, nil end
  local h = redis.call('HMGET', key, 't', 'o', 'n')
  local total, o, n = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if not total then return 0, span, nil, nil end
  local cutoff = now - span
  if n <= cutoff then
    redis.call('DEL', key)
    return 0, span, nil, nil
  end
  if o <= cutoff then
    while o <= cutoff do  -- o is held: drop it, then find the next second held
      total = total - tonumber(redis.call('HGET', key, o) or '0')
      redis.call('HDEL', key, o)
      repeat o = o + 1 until redis.call('HEXISTS', key, o) == 1
    end
    redis.call('HSET', key, 't', total, 'o', o)
  end
  return total, o + span - now, o, n
end

-- o and n: what window_sum left for this key in this same call.
local function window_add(key, amount, span, o, n)
  if span == 0 then
    redis.call('INCRBY', key, amount)
    redis.call('EXPIRE', key, period_ttl)
    return
  end
  redis.call('HINCRBY', key, now, amount)
  redis.call('HINCRBY', key, 't', amount)
  -- Another process's clock may be a little behind: its bucket can be the oldest.
  if not o or now < o then redis.call('HSET', key, 'o', now) end
  if not n or now > n then redis.call('HSET', key, 'n', now) end
  redis.call('EXPIRE', key, span + 5)
end

-- Reservations and leases of crashed processes expire here.
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms)
for _, l in ipairs(expired) do
  local c = tonumber(redis.call('HGET', KEYS[5], l) or '0')
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HINCRBY', KEYS[3], 'reserved', -c) end
  redis.call('HDEL', KEYS[5], l)
  redis.call('ZREM', KEYS[4], l)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)

local rows = {}
for i = 1, #KEYS - 6 do
  local a = 3 * i + 7
  local limit, amount, span = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local total, reset, o, n = window_sum(KEYS[6 + i], span)
  if total + amount > limit then return {1, math.max(1, reset), i} end
  rows[i] = {KEYS[6 + i], amount, span, o, n, limit - total - amount, reset}
end
if conc >= 0 and redis.call('ZCARD', KEYS[1]) >= conc then return {2, 1, 'concurrency'} end
if uconc >= 0 and redis.call('ZCARD', KEYS[2]) >= uconc then return {2, 1, 'user_concurrency'} end
if budget >= 0 then
  if redis.call('EXISTS', KEYS[3]) == 0 then return {9, 0, 'budget'} end
  local spent = tonumber(redis.call('HGET', KEYS[3], 'used') or '0')
  local held = tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
  if spent + held + cost > budget then return {3, 0, 'budget'} end
end

local out = {0}
for _, r in ipairs(rows) do
  window_add(r[1], r[2], r[3], r[4], r[5])
  out[#out + 1] = r[6]
  out[#out + 1] = r[7]
end
if conc >= 0 then redis.call('ZADD', KEYS[1], expiry, lease) end
if uconc >= 0 then redis.call('ZADD', KEYS[2], expiry, lease) end
if budget >= 0 then
  redis.call('HINCRBY', KEYS[3], 'reserved', cost)
  redis.call('EXPIRE', KEYS[3], period_ttl)
  redis.call('ZADD', KEYS[4], expiry, lease)
  redis.call('HSET', KEYS[5], lease, cost)
  redis.call('EXPIRE', KEYS[4], period_ttl)
  redis.call('EXPIRE', KEYS[5], period_ttl)
end
if hash ~= '' then  -- claimed until settled (or the lease of a crashed process expires)
  redis.call('HSET', idem, 'h', hash, 'l', lease)
  redis.call('PEXPIRE', idem, tonumber(ARGV[4]))
end
return out
"""

# KEYS: ADMIT's six fixed ones, then the window counters that count tokens.
# ARGV: 1 lease, 2 bucket second, 3 cost, 4 actual tokens, 5 the result to replay
#       ('' frees the request id), 6 seconds to keep it, then per window counter (from
#       7, as its key) its span s (0 = PERIOD)
SETTLE = """
-- Only this request's own claim (one that expired may have been claimed again since).
if redis.call('HGET', KEYS[6], 'l') == ARGV[1] then
  if ARGV[5] == '' then
    redis.call('DEL', KEYS[6])
  else
    redis.call('HSET', KEYS[6], 'r', ARGV[5])
    redis.call('EXPIRE', KEYS[6], tonumber(ARGV[6]))
  end
end
local lease, bucket = ARGV[1], ARGV[2]
local delta = tonumber(ARGV[4]) - tonumber(ARGV[3])
redis.call('ZREM', KEYS[1], lease)
redis.call('ZREM', KEYS[2], lease)
for i = 7, #KEYS do
  local k = KEYS[i]
  if ARGV[i] == '0' then
    if redis.call('EXISTS', k) == 1 then redis.call('INCRBY', k, delta) end
  elseif redis.call('HEXISTS', k, bucket) == 1 then
    redis.call('HINCRBY', k, bucket, delta)
    redis.call('HINCRBY', k, 't', delta)
  end
end
local c = redis.call('HGET', KEYS[5], lease)
local live = redis.call('EXISTS', KEYS[3]) == 1
if c then
  if live then redis.call('HINCRBY', KEYS[3], 'reserved', -tonumber(c)) end
  redis.call('HDEL', KEYS[5], lease)
  redis.call('ZREM', KEYS[4], lease)
end
if live then redis.call('HINCRBY', KEYS[3], 'used', tonumber(ARGV[4])) end
return 1
"""

# KEYS: ADMIT's six fixed ones. ARGV: 1 lease, 2 new expiry ms, 3 lease ttl ms
RENEW = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], 'XX', ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[3]))
return 1
"""


def tenant_prefix(namespace: str, tenant_id: object) -> str:
    """Every key of a tenant starts so: the hash tag ``{tenant id}`` keeps them in one
    Redis Cluster slot, so the scripts stay atomic there too."""
    return f"{namespace}:{{{tenant_id}}}"


def fixed_keys(t: str, user: str, period: str, request_id: str | None) -> list[str]:
    """The six fixed keys of a tenant (prefix ``t``) and end user, in ``FIXED_KEYS``'
    order. Without a request id the idempotency slot names a key no request id can have."""
    u = f"{t}:u:{user}"
    idem = f"{t}:idem:{request_id}" if request_id is not None else f"{t}:idem"
    return [f"{t}:conc", f"{u}:conc", f"{t}:budget:{period}", f"{t}:res:exp",
            f"{t}:res:cost", idem]


def window_key(t: str, user: str, period: str, window: Window) -> str:
    """The counter of ``window`` for a tenant (prefix ``t``) or its end user; a period's
    counter names its period, so the next month starts from zero. The sliding windows'
    names are those of the running-total layout, which an older process in a rolling
    upgrade shares."""
    owner = f"{t}:u:{user}" if window.per_user else t
    return f"{owner}:{window.key}:{period}" if window.span_s == PERIOD else f"{owner}:{window.key}"


class Commands(Protocol):
    """What runs the scripts: redis-py's client, or the limiter's own ``RedisPipe``."""

    async def execute_command(self, *args: Any) -> Any: ...


class LuaScript:
    """A Lua script, run by its SHA and loaded again if Redis has lost it (a restart).
    redis-py's own Script does the same, plus a typing-Protocol ``isinstance`` check per
    call that costs a tenth of the call."""

    def __init__(self, redis: Commands, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324  # Redis's name

    async def __call__(self, *, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        """Run it on ``keys`` with ``args``; its reply."""
        try:
            return await self.redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.execute_command("SCRIPT", "LOAD", self.source)
            return await self.redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
