-- The RedisStore script: checks and charges every bucket of one call
-- atomically, in one round trip. redis.go explains the design; in short:
--
--   * Redis Lua numbers are doubles, exact for integers below 2^53 only. Unix
--     nanoseconds (~1.8e18) are not, so absolute times are kept as two
--     integers, seconds and nanoseconds, and every other quantity is a
--     nanosecond offset bounded by MAXB (2^52, about 52 days): the sum or the
--     difference of two of them is still exact.
--   * Go does the arithmetic that multiplies or divides (spans, tolerances,
--     remaining units) with its exact 64- and 128-bit helpers; the script only
--     adds, subtracts and compares, except to rescale a bucket whose limit
--     changed, which uses exact big-integer arithmetic below.
--
-- KEYS: the buckets' full keys, all in one hash slot.
-- ARGV[1]  operation: 'r' reserve, 'a' adjust, 'p' peek
-- ARGV[2]  now, whole seconds of Unix time; '' to read the server's clock
-- ARGV[3]  now, nanoseconds within the second
-- ARGV[4]  reserve only: the longest wait admitted, in ns
-- ARGV[5]  slack added to a rate bucket's expiry, in ms
-- ARGV[6]  a concurrency bucket's expiry, in ms
-- ARGV[7]  four little-endian doubles per key (struct.pack '<dddd', 32
--          bytes a key, in KEYS order): count, window (ns; 0 for a
--          concurrency limit), x, tol. One packed argument rather than four
--          a key spares the server an argument object and a tonumber each.
--   x: a rate charge's span in ns (signed in adjust), or a concurrency
--      charge's cost in units;
--   tol: a rate bucket's tolerance in ns.
--
-- A bucket is stored as five little-endian doubles (struct.pack '<ddddd',
-- 40 bytes), seen_s seen_ns level count window, all integers below 2^53 and
-- so exact; packing and unpacking them costs the server about a
-- microsecond, where formatting and parsing them as text cost about five
-- per bucket:
-- seen is the (effective) time of the write; level is, for a rate bucket, its
-- backlog at seen (TAT - seen, in ns, > 0), and for a concurrency bucket the
-- units held (> 0); count and window are the limit the level was computed
-- under. A full rate bucket or an empty concurrency bucket is not stored.
--
-- The script runs on every admission, so it is written for the server's
-- time: one MGET and one PSETEX or DEL per changed bucket are the only calls
-- besides TIME. Lua's instructions and tables cost more than its C helpers:
-- a packed value is unpacked again where it is needed rather than copied
-- into tables, the state of every bucket lives in one flat table created
-- with room for four buckets (a table that grows is reallocated at every
-- power of two), and the exact big-integer helpers are only built when a
-- limit changed. Measured with 20,000 pipelined calls of three buckets on a
-- quiet server (the least of seven runs), this takes 10.0-10.4 µs a call
-- where the version before it, with a table per field, took 12.0-12.2.
--
-- Reply: {allowed (1/0), wait (ns), limiting (0-based, or -1), v1 .. vn},
-- where vi is, after the call, the backlog in ns of rate bucket i relative to
-- the call's time, or the units held by concurrency bucket i.

local MAXB = 4503599627370496 -- 2^52: redisMaxSpan in redis.go
local KEYS, ARGV = KEYS, ARGV
local sunpack, spack = struct.unpack, struct.pack
local PACKED = ARGV[7] -- the per-key arguments, packed

local op = ARGV[1]
if op ~= 'r' and op ~= 'a' and op ~= 'p' then
  return redis.error_reply('ERR llm_rate_limit: unknown operation')
end
local n = #KEYS
if #PACKED ~= 32 * n then
  return redis.error_reply('ERR llm_rate_limit: ' .. #PACKED .. ' bytes of arguments for ' .. n .. ' keys')
end

local now_s, now_ns
if ARGV[2] == '' then
  -- Scripts that read the clock and then write must be replicated by their
  -- effects. That is the only mode from Redis 7 on (which has
  -- REDIS_VERSION_NUM, and where the call is a deprecated no-op) and the
  -- default from 5 on; 3.2 to 4 need the call.
  if not redis.REDIS_VERSION_NUM and redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
else
  now_s, now_ns = tonumber(ARGV[2]), tonumber(ARGV[3])
end
local maxwait = tonumber(ARGV[4])
local slack_ms = tonumber(ARGV[5])
local conc_ttl = tonumber(ARGV[6])

-- Load every bucket first: the call's time is the latest of now and every
-- bucket's last write, so that a stale timestamp (or a server clock that
-- stepped back, say after a failover to a replica) sees the buckets as they
-- are at the latest known instant, never as they were earlier.
--
-- One MGET for every key: each redis.call costs a few microseconds of the
-- server's time, more than the arithmetic below. A value that is not a
-- packed bucket (another length, or numbers out of their ranges; NaN fails
-- every comparison) is not ours: vals[i] becomes false, the bucket is
-- treated as absent, and overwritten if the call writes it.
local vals = redis.call('MGET', unpack(KEYS))
for i = 1, n do
  local v = vals[i]
  if v then
    local ok = false
    if #v == 40 then
      local s, ns, x, c, w = sunpack('<ddddd', v)
      if ns >= 0 and ns < 1e9 and x >= 0 and x <= MAXB and c >= 1 and w >= 0 and s == math.floor(s) then
        ok = true
        if s > now_s or (s == now_s and ns > now_ns) then
          now_s, now_ns = s, ns
        end
      end
    end
    if not ok then vals[i] = false end
  end
end

-- rescale converts a backlog of b ns at count co per window wo to the same
-- units at cn per wn: ceil(b*co*wn / (wo*cn)), capped at MAXB, exactly as
-- rescale in limit.go. A double estimate is within a few ns of the answer;
-- the exact comparisons then step to the smallest x with x*wo*cn >= b*co*wn.
-- It runs once per bucket per limit change, so its cost does not matter,
-- and its helpers are built only then.
local function rescale(b, co, wo, cn, wn)
  -- Exact non-negative integers of any size, as little-endian arrays of
  -- 24-bit limbs: a limb product is below 2^48, so a product row with its
  -- carry stays exact in a double.
  local BASE = 16777216
  local function big(v)
    local r, k = {}, 1
    repeat
      local lo = v % BASE
      r[k] = lo
      v = (v - lo) / BASE
      k = k + 1
    until v == 0
    return r
  end
  local function mul(a, c)
    local r = {}
    for k = 1, #a + #c do r[k] = 0 end
    for i = 1, #a do
      local carry = 0
      for j = 1, #c do
        local t = r[i + j - 1] + a[i] * c[j] + carry
        local lo = t % BASE
        r[i + j - 1] = lo
        carry = (t - lo) / BASE
      end
      r[i + #c] = carry
    end
    return r
  end
  local function cmp(a, c)
    for k = math.max(#a, #c), 1, -1 do
      local x, y = a[k] or 0, c[k] or 0
      if x ~= y then
        if x < y then return -1 end
        return 1
      end
    end
    return 0
  end
  local num = mul(mul(big(b), big(co)), big(wn))
  local den = mul(big(wo), big(cn))
  local x = math.ceil(b / wo * co / cn * wn)
  if not (x <= MAXB) then x = MAXB end -- also catches a NaN
  if x < 0 then x = 0 end
  while x < MAXB and cmp(mul(big(x), den), num) < 0 do x = x + 1 end
  while x > 0 and cmp(mul(big(x - 1), den), num) >= 0 do x = x - 1 end
  return x
end

-- Each bucket's level at the call's time. The keys of one call should be
-- distinct, but a key given twice is one bucket, as in MemoryStore: a slot
-- per distinct key holds its level and the limit it is under, and every
-- charge on the key works on that slot. A slot is the index of the key's
-- first charge. st holds four values a slot, at 4*slot-3 .. 4*slot: level,
-- count, window (nil while the slot has no limit yet), dirty.
local slot = { 1, 2, 3, 4 }
local st = { 0, 0, 0, false, 0, 0, 0, false, 0, 0, 0, false, 0, 0, 0, false }
for i = 1, n do
  local key = KEYS[i]
  local sl = i
  for j = 1, i - 1 do
    if KEYS[j] == key then sl = slot[j]; break end
  end
  slot[i] = sl
  local b = 4 * sl
  if sl == i then
    local v, oc, ow = 0, nil, nil
    local rec = vals[i]
    if rec then
      local s, ns, x
      s, ns, x, oc, ow = sunpack('<ddddd', rec)
      if ow == 0 then
        v = x
      else
        -- The backlog drains with time. Past 4.6e6 s (more than MAXB ns)
        -- any backlog has drained, and below it ds * 1e9 is exact.
        local ds = now_s - s
        if ds < 4600000 then
          v = x - (ds * 1e9 + (now_ns - ns))
          if v < 0 then v = 0 end
        end
      end
    end
    st[b - 3], st[b - 2], st[b - 1], st[b] = v, oc, ow, false
  end

  -- Bring the level under the charge's limit (MemoryStore's load).
  local c, w = sunpack('<dd', PACKED, i * 32 - 31)
  local oc, ow = st[b - 2], st[b - 1]
  if not oc then
    -- No bucket yet: one written by this call is under this limit.
    st[b - 2], st[b - 1] = c, w
  elseif (ow == 0) ~= (w == 0) then
    -- Last used under the other kind of limit, whose level means nothing
    -- to this one: the bucket starts empty (a rate bucket full, a
    -- concurrency bucket holding nothing).
    st[b - 3], st[b - 2], st[b - 1], st[b] = 0, c, w, true
  elseif w == 0 then
    -- What is held stays held, whatever the new count says.
    st[b - 2] = c
  elseif oc ~= c or ow ~= w then
    if st[b - 3] > 0 then st[b - 3] = rescale(st[b - 3], oc, ow, c, w) end
    st[b - 2], st[b - 1], st[b] = c, w, true
  end
end

-- The decision of MemoryStore.Reserve: every rate bucket's wait for its
-- charge to conform, the request waiting for the slowest; a concurrency
-- bucket without room refuses whatever maxWait says.
-- apply says whether the charges are made: always in Adjust, never in
-- Peek (which only records a rescale, below), in Reserve when it admits.
local allowed, wait, limiting = 1, 0, -1
local apply = op == 'a'
if op == 'r' then
  local full = -1
  for i = 1, n do
    local c, w, x, tol = sunpack('<dddd', PACKED, i * 32 - 31)
    local v = st[4 * slot[i] - 3]
    if w == 0 then
      if full < 0 and x > 0 and v > 0 and v + x > c then full = i - 1 end
    elseif x > 0 then
      -- A charge larger than the capacity conforms once the bucket is full.
      if x > tol then x = tol end
      local d = v - tol + x
      if d > wait then wait, limiting = d, i - 1 end
    end
  end
  if full >= 0 or wait > maxwait then allowed = 0 end
  if full >= 0 then limiting = full end
  apply = allowed == 1
end

-- Apply every charge (Adjust's are signed corrections, made without a
-- check): debts saturate at MAXB; a refund cannot fill a
-- rate bucket beyond full nor give a concurrency bucket credit. res[3 + i]
-- is the level of charge i's bucket after its charge, applied or not: what
-- its state is reported from.
local res = { 0, 0, 0, 0, 0, 0, 0 }
for i = 1, n do
  local b = 4 * slot[i]
  if apply then
    local _, _, x = sunpack('<ddd', PACKED, i * 32 - 31)
    if x ~= 0 then
      local v = st[b - 3] + x
      if v < 0 then v = 0 end
      if v > MAXB then v = MAXB end
      st[b - 3], st[b] = v, true
    end
  end
  res[3 + i] = st[b - 3]
end

-- Write what changed. A number argument reaches Redis as its shortest exact
-- text, so a TTL (whole milliseconds, far below 2^53) needs no formatting.
for i = 1, n do
  local b = 4 * i
  if slot[i] == i and st[b] then
    local v = st[b - 3]
    if v > 0 then
      -- A rate bucket expires when it would be full again, plus the slack;
      -- a concurrency bucket after a fixed time, refreshed by every write.
      local w = st[b - 1]
      local ttl = conc_ttl
      if w ~= 0 then ttl = math.ceil(v / 1e6) + slack_ms end
      redis.call('PSETEX', KEYS[i], ttl, spack('<ddddd', now_s, now_ns, v, st[b - 2], w))
    elseif vals[i] then
      -- Full, or holding nothing: the same as no bucket at all.
      redis.call('DEL', KEYS[i])
    end
  end
end

res[1], res[2], res[3] = allowed, wait, limiting
-- The reply is exactly 3 + n values: cut the presized table's spare ones.
for i = n + 4, 7 do res[i] = nil end
return res
