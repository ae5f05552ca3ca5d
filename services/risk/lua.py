"""The risk state's Lua scripts (Redis >= 6.2, EVALSHA; no Redis Functions).

Each script is the step of the same name in ``state.MemoryRiskState``, line for line: that
class is the readable reference, these are what run in Redis. Every state key shares one hash
tag (``KeySpace.tagged``), so the layout works on Redis Cluster. DECIDE may also publish an
approval (``decisions``, ``orders``) and acknowledge its signal: streams outside that tag, so
the service asks for it only on a single Redis (``docs/risk.md``).

Numbers: amounts are integer strings (1e-8 units) changed with HINCRBY (exact int64);
comparisons use ``tonumber`` (doubles), which the memory state reproduces. Values read
from Redis are returned as the strings Redis holds, never re-formatted from a double.
"""

from __future__ import annotations

_COMMON = r"""
local SEP = '\31'
local K_STATE = KEYS[2]
local function incr(f, d)
  local v = redis.call('HINCRBY', K_STATE, f, d)
  if v == 0 then redis.call('HDEL', K_STATE, f) end
  return v
end
local function bump() redis.call('HINCRBY', K_STATE, 'ver', 1) end
local function release(K_RES, K_EXP, aid)
  redis.call('ZREM', K_EXP, aid)
  local rec = redis.call('HGET', K_RES, aid)
  if not rec then return 0 end
  redis.call('HDEL', K_RES, aid)
  for f, u in string.gmatch(rec, '(%S+) (%S+)') do incr(f, '-' .. u) end
  return 1
end
local function apply(K_RES, K_EXP, K_COOL, aid, record, expires, now, cools, rates)
  for f, u in string.gmatch(record, '(%S+) (%S+)') do incr(f, u) end
  redis.call('HSET', K_RES, aid, record)
  redis.call('ZADD', K_EXP, expires, aid)
  for _, c in ipairs(cools) do
    local u = tonumber(c[2])
    if u > now then
      local cur = redis.call('HGET', K_COOL, c[1])
      if not cur or u > tonumber(cur) then redis.call('HSET', K_COOL, c[1], c[2]) end
    end
  end
  for _, r in ipairs(rates) do
    for n = 0, r[2] - 1 do redis.call('ZADD', r[1], now, aid .. ':' .. n) end
  end
  bump()
end
"""

# KEYS: halt, state, reservations, expiry, verdicts, verdict_times, cooldowns, balances, settled,
#       orders:<ex> (one per rate claim), then, when an approval is published here: signals, orders, decisions
# ARGV[1]: the arguments below joined by \x1f (one packed string is much cheaper for the client to
# send than seventy): now_ms, signal_id, arb_id, ts_ns, notional, intent_expires_ns, reservation_expires_ms,
#       verdict_retention_ms, day, daily_limit, starting_equity, max_drawdown, require_balances,
#       record, rate_window_ms,
#       n, (cooldown, until, reason)*n, n, (exchange, orders, limit)*n,
#       n, (counter, units, cap, reason)*n, n, (exchange:ASSET, units)*n
# ARGV[2..6] (optional): the signal's entry id, the group, the order intent, the approving decision,
#       the decisions stream's MAXLEN ('' = none). With them an approval is published and its signal acknowledged
#       in the same atomic step as the reservation: no reservation without its intent on ``orders``,
#       no acknowledged signal without its decision. Any other verdict is left to the caller.
DECIDE = _COMMON + r"""
local function split(s)
  -- one C-level scan (string.find/sub per field costs twice as much); every field, empty ones too
  local out, n = {}, 0
  for f in string.gmatch(s .. SEP, '([^' .. SEP .. ']*)' .. SEP) do
    n = n + 1
    out[n] = f
  end
  return out
end
local PUB = {ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}
local ARGV = split(ARGV[1])
local K_HALT, K_RES, K_EXP, K_VERD = KEYS[1], KEYS[3], KEYS[4], KEYS[5]
local K_VERT, K_COOL, K_BAL = KEYS[6], KEYS[7], KEYS[8]
local now_s, sid, aid, ts, notional, expires = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local res_expires = ARGV[7]
local now = tonumber(now_s)
if not redis.call('HGET', K_STATE, 'init') then return {'noinit'} end
local prev = redis.call('HGET', K_VERD, sid)
if prev then return {'dup', prev} end
-- its verdict forgotten (a restore), the arbitrage itself is not: never reserve it twice
if redis.call('HEXISTS', K_RES, aid) == 1 then return {'held'} end
if redis.call('ZSCORE', KEYS[9], aid) then return {'done'} end

local i = 16
local cools, cool_fields = {}, {}
for c = 1, tonumber(ARGV[i]) do
  cools[c] = {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
  cool_fields[c] = ARGV[i + 1]
  i = i + 3
end
i = i + 1
local rates = {}
local nrates = tonumber(ARGV[i])
i = i + 1
for j = 1, nrates do
  rates[j] = {KEYS[9 + j], ARGV[i], ARGV[i + 1], ARGV[i + 2]}
  i = i + 3
end
local claims = {}
local nclaims = tonumber(ARGV[i])
i = i + 1
for c = 1, nclaims do
  claims[c] = {ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
  i = i + 4
end
local bals, bal_fields = {}, {}
for b = 1, tonumber(ARGV[i]) do
  bals[b] = {ARGV[i + 1], ARGV[i + 2]}
  bal_fields[b] = 'b:' .. ARGV[i + 1]
  i = i + 2
end

local old = redis.call('ZRANGEBYSCORE', K_VERT, '-inf', now - tonumber(ARGV[8]), 'LIMIT', 0, 64)
for _, m in ipairs(old) do
  redis.call('ZREM', K_VERT, m)
  redis.call('HDEL', K_VERD, m)
end
local expired = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', now, 'LIMIT', 0, 64)
for _, a in ipairs(expired) do release(K_RES, K_EXP, a) end
if #expired > 0 then bump() end

local function verdict(reason, subject, current, amount, cap)
  local v = table.concat({reason, ts, notional, expires, subject or '', current or '', amount or '', cap or ''}, SEP)
  redis.call('HSET', K_VERD, sid, v)
  redis.call('ZADD', K_VERT, now_s, sid)
  return {'new', v}
end

local halt = redis.call('GET', K_HALT)
if halt then return verdict('halted', halt) end
-- every state field the checks read, in one call
local fields = {'breaker:until', 'pnl:day', 'pnl:daily', 'pnl:total', 'pnl:peak'}
for _, c in ipairs(claims) do fields[#fields + 1] = c[1] end
for _, b in ipairs(bals) do fields[#fields + 1] = 'rb:' .. b[1] end
local st = redis.call('HMGET', K_STATE, unpack(fields))
local bu = st[1]
if bu and tonumber(bu) > now then return verdict('circuit_breaker', '', bu) end
local day = ARGV[9]
if st[2] == day then
  local daily = st[3] or '0'
  if tonumber(daily) <= -tonumber(ARGV[10]) then return verdict('daily_loss', day, daily, '', ARGV[10]) end
end
local total, peak = st[4] or '0', st[5] or '0'
local start = tonumber(ARGV[11])
local peq = start + tonumber(peak)
if peq > 0 and (peq - (start + tonumber(total))) / peq >= tonumber(ARGV[12]) then
  return verdict('drawdown', '', total, peak, ARGV[12])
end
if #cools > 0 then
  local running = redis.call('HMGET', K_COOL, unpack(cool_fields))
  for c, cool in ipairs(cools) do
    if running[c] and tonumber(running[c]) > now then return verdict(cool[3], cool[1], running[c]) end
  end
end
local window = tonumber(ARGV[15])
local adds = {}
for _, r in ipairs(rates) do
  redis.call('ZREMRANGEBYSCORE', r[1], '-inf', now - window)
  local n = redis.call('ZCARD', r[1])
  if n + tonumber(r[3]) > tonumber(r[4]) then return verdict('order_rate', r[2], tostring(n), r[3], r[4]) end
  adds[#adds + 1] = {r[1], tonumber(r[3])}
end
for c, claim in ipairs(claims) do
  local cur = st[5 + c] or '0'
  if tonumber(cur) + tonumber(claim[2]) > tonumber(claim[3]) then
    return verdict(claim[4], claim[1], cur, claim[2], claim[3])
  end
end
if #bals > 0 then
  local avail = redis.call('HMGET', K_BAL, unpack(bal_fields))
  for b, bal in ipairs(bals) do
    local reserved = st[5 + nclaims + b] or '0'
    if not avail[b] then
      if ARGV[13] == '1' then return verdict('balance', bal[1], '', bal[2], reserved) end
    elseif tonumber(avail[b]) - tonumber(reserved) < tonumber(bal[2]) then
      return verdict('balance', bal[1], avail[b], bal[2], reserved)
    end
  end
end
if PUB[1] then
  -- before any counter moves, so a refused write leaves no reservation behind; the decision first,
  -- so an intent never stands without it
  local k = 10 + nrates
  if PUB[5] ~= '' then
    redis.call('XADD', KEYS[k + 2], 'MAXLEN', '~', PUB[5], '*', 'd', PUB[4])
  else
    redis.call('XADD', KEYS[k + 2], '*', 'd', PUB[4])
  end
  redis.call('XADD', KEYS[k + 1], '*', 'd', PUB[3])
  redis.call('XACK', KEYS[k], PUB[2], PUB[1])
end
apply(K_RES, K_EXP, K_COOL, aid, ARGV[14], res_expires, now, cools, adds)
local v = verdict('approved')
if PUB[1] then return {'published', v[2]} end
return v
"""

# KEYS: halt, state, reservations, expiry, settled, cooldowns
# ARGV: arb_id, ts_ms, pnl, day, daily_limit, starting_equity, max_drawdown, breaker_losses,
#       breaker_until_ms, halt_payload, settled_retention_ms, force, n, (cooldown, until)*n
SETTLE = _COMMON + r"""
local K_HALT, K_RES, K_EXP, K_SET, K_COOL = KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local aid, ts_s, pnl_s, day = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[12] ~= '1' and not redis.call('HGET', K_STATE, 'init') then return {'noinit'} end
if redis.call('ZSCORE', K_SET, aid) then return {'dup'} end
local released = release(K_RES, K_EXP, aid)
local triggers = {}
-- the day only rolls forward: a late execution of a past day counts in the total, not today
local stored_day = redis.call('HGET', K_STATE, 'pnl:day')
if not stored_day or day > stored_day then
  redis.call('HSET', K_STATE, 'pnl:day', day)
  redis.call('HDEL', K_STATE, 'pnl:daily')
end
local past_day = stored_day and day < stored_day
local daily
if past_day then
  daily = tonumber(redis.call('HGET', K_STATE, 'pnl:daily') or '0')
else
  daily = incr('pnl:daily', pnl_s)
end
local total = incr('pnl:total', pnl_s)
local total_s = redis.call('HGET', K_STATE, 'pnl:total') or '0'
local peak_s = redis.call('HGET', K_STATE, 'pnl:peak') or '0'
if total > tonumber(peak_s) then
  peak_s = total_s
  redis.call('HSET', K_STATE, 'pnl:peak', total_s)
end
if not past_day and daily <= -tonumber(ARGV[5]) and redis.call('HGET', K_STATE, 'alert:daily') ~= day then
  redis.call('HSET', K_STATE, 'alert:daily', day)
  triggers[#triggers + 1] = 'daily_loss'
end
local start = tonumber(ARGV[6])
local peq = start + tonumber(peak_s)
if peq > 0 and (peq - (start + total)) / peq >= tonumber(ARGV[7]) then
  if not redis.call('HGET', K_STATE, 'alert:dd') then
    redis.call('HSET', K_STATE, 'alert:dd', '1')
    triggers[#triggers + 1] = 'drawdown'
  end
else
  redis.call('HDEL', K_STATE, 'alert:dd')
end
local streak = tonumber(redis.call('HGET', K_STATE, 'loss:streak') or '0')
local pnl = tonumber(pnl_s)
if pnl < 0 then
  streak = incr('loss:streak', '1')
  if streak >= tonumber(ARGV[8]) then
    local bu = redis.call('HGET', K_STATE, 'breaker:until')
    if not bu or tonumber(ARGV[9]) > tonumber(bu) then redis.call('HSET', K_STATE, 'breaker:until', ARGV[9]) end
    redis.call('HDEL', K_STATE, 'loss:streak')
    streak = 0
    triggers[#triggers + 1] = 'circuit_breaker'
  end
  local i = 14
  for c = 1, tonumber(ARGV[13]) do
    local f, u = ARGV[i], ARGV[i + 1]
    i = i + 2
    local cur = redis.call('HGET', K_COOL, f)
    if not cur or tonumber(u) > tonumber(cur) then redis.call('HSET', K_COOL, f, u) end
  end
elseif pnl > 0 then
  redis.call('HDEL', K_STATE, 'loss:streak')
  streak = 0
end
if ARGV[10] ~= '' and redis.call('EXISTS', K_HALT) == 0 then
  redis.call('SET', K_HALT, ARGV[10])
  triggers[#triggers + 1] = 'kill_switch'
end
redis.call('ZADD', K_SET, ts_s, aid)
local old = redis.call('ZRANGEBYSCORE', K_SET, '-inf', tonumber(ts_s) - tonumber(ARGV[11]), 'LIMIT', 0, 64)
for _, m in ipairs(old) do redis.call('ZREM', K_SET, m) end
bump()
local daily_s = redis.call('HGET', K_STATE, 'pnl:daily') or '0'
return {'ok', released, daily_s, total_s, peak_s, tostring(streak), unpack(triggers)}
"""

# KEYS: halt, state, reservations, expiry.  ARGV: now_ms, limit
EXPIRE = _COMMON + r"""
local K_RES, K_EXP = KEYS[3], KEYS[4]
local expired = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, a in ipairs(expired) do release(K_RES, K_EXP, a) end
if #expired > 0 then bump() end
return expired
"""

# KEYS: halt, state, balances.  ARGV: exchange:ASSET, units, ts_ns (a non-negative integer string)
BALANCE = _COMMON + r"""
local K_BAL = KEYS[3]
local k, units, ts = ARGV[1], ARGV[2], ARGV[3]
local seen = redis.call('HGET', K_BAL, 't:' .. k)
if seen and (#seen > #ts or (#seen == #ts and seen > ts)) then return 0 end
redis.call('HSET', K_BAL, 'b:' .. k, units, 't:' .. k, ts)
bump()
return 1
"""

# KEYS: halt, state, reservations, expiry, verdicts, verdict_times, cooldowns, settled, orders:<ex>...
# ARGV: signal_id, stored verdict, now_ms, arb_id ('' = no reservation), expires_ms, record,
#       n, (cooldown, until)*n, (orders)*#rate keys
APPLY_DECISION = _COMMON + r"""
local K_RES, K_EXP, K_VERD, K_VERT, K_COOL = KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local sid, now_s, aid = ARGV[1], ARGV[3], ARGV[4]
if redis.call('HEXISTS', K_VERD, sid) == 1 then return 0 end
if aid ~= '' and redis.call('HEXISTS', K_RES, aid) == 0 and not redis.call('ZSCORE', KEYS[8], aid) then
  local cools, rates = {}, {}
  local i = 8
  for c = 1, tonumber(ARGV[7]) do
    cools[c] = {ARGV[i], ARGV[i + 1]}
    i = i + 2
  end
  for j = 9, #KEYS do
    rates[#rates + 1] = {KEYS[j], tonumber(ARGV[i])}
    i = i + 1
  end
  apply(K_RES, K_EXP, K_COOL, aid, ARGV[6], ARGV[5], tonumber(now_s), cools, rates)
end
redis.call('HSET', K_VERD, sid, ARGV[2])
redis.call('ZADD', K_VERT, now_s, sid)
return 1
"""

# KEYS: halt, state.  ARGV: payload ('' = lift), guards ('1' = also circuit breaker and drawdown)
HALT = _COMMON + r"""
local K_HALT = KEYS[1]
local had = redis.call('EXISTS', K_HALT)
if ARGV[1] ~= '' then
  redis.call('SET', K_HALT, ARGV[1])
else
  redis.call('DEL', K_HALT)
  if ARGV[2] == '1' then
    redis.call('HDEL', K_STATE, 'breaker:until', 'loss:streak', 'alert:dd')
    redis.call('HSET', K_STATE, 'pnl:peak', redis.call('HGET', K_STATE, 'pnl:total') or '0')
  end
end
bump()
return had
"""

# KEYS: halt, state, reservations, expiry, verdicts, verdict_times, settled, cooldowns, balances,
#       orders:<ex>...  ARGV: '1' to include the verdicts.  Returns the time and every key's content.
DUMP = r"""
local t = redis.call('TIME')
local verdicts = ARGV[1] == '1'
local out = {t[1], t[2], redis.call('GET', KEYS[1]) or ''}
for _, j in ipairs({2, 3, 5, 8, 9}) do
  out[#out + 1] = (j ~= 5 or verdicts) and redis.call('HGETALL', KEYS[j]) or {}
end
for j = 4, #KEYS do
  if j == 4 or j == 6 or j == 7 or j >= 10 then
    out[#out + 1] = (j ~= 6 or verdicts) and redis.call('ZRANGE', KEYS[j], 0, -1, 'WITHSCORES') or {}
  end
end
return out
"""

# KEYS: as DUMP.  ARGV: JSON of the state (all values strings), then the exchange of each orders key.
# Writes everything except ``init``: the restorer sets it once the streams are replayed too.
RESTORE = r"""
local d = cjson.decode(ARGV[1])
for j = 2, #KEYS do redis.call('DEL', KEYS[j]) end
if d.halt and d.halt ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], d.halt) end
local function hset(key, t)
  for f, v in pairs(t or {}) do
    if f ~= 'init' then redis.call('HSET', key, f, v) end
  end
end
local function zadd(key, t)
  for m, s in pairs(t or {}) do redis.call('ZADD', key, s, m) end
end
hset(KEYS[2], d.state)
hset(KEYS[3], d.reservations)
zadd(KEYS[4], d.expiry)
hset(KEYS[5], d.verdicts)
zadd(KEYS[6], d.verdict_times)
zadd(KEYS[7], d.settled)
hset(KEYS[8], d.cooldowns)
hset(KEYS[9], d.balances)
for j = 10, #KEYS do zadd(KEYS[j], (d.orders or {})[ARGV[j - 8]]) end
return 1
"""
