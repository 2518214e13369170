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
-- Reply: {allowed (1/0), wait (ns), limiting (0-based, or -1), v1 .. vn},
-- where vi is, after the call, the backlog in ns of rate bucket i relative to
-- the call's time, or the units held by concurrency bucket i.

local MAXB = 4503599627370496 -- 2^52: redisMaxSpan in redis.go
local PACKED = ARGV[7]         -- the per-key arguments, packed

local op = ARGV[1]
local n = #KEYS
if #PACKED ~= 32 * n then
  return redis.error_reply('ERR llm_rate_limit: ' .. #PACKED .. ' bytes of arguments for ' .. n .. ' keys')
end

local now_s, now_ns
if ARGV[2] == '' then
  -- Scripts that read the clock and then write must be replicated by their
  -- effects. That is the only mode from Redis 7 on (where this call is a
  -- deprecated no-op) and the default from 5 on; 3.2 to 4 need the call.
  if redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
else
  now_s, now_ns = tonumber(ARGV[2]), tonumber(ARGV[3])
end
local maxwait = tonumber(ARGV[4])
local slack_ms = tonumber(ARGV[5])
local conc_ttl = ARGV[6]

-- Load every bucket first: the call's time is the latest of now and every
-- bucket's last write, so that a stale timestamp (or a server clock that
-- stepped back, say after a failover to a replica) sees the buckets as they
-- are at the latest known instant, never as they were earlier.
local rec = {}
-- One MGET for every key: each redis.call costs a few microseconds of the
-- server's time, more than the arithmetic below.
local vals = redis.call('MGET', unpack(KEYS))
for i = 1, n do
  local v = vals[i]
  if v then
    -- A value that is not a packed bucket (another length, or numbers out
    -- of their ranges; NaN fails every comparison) is not ours: treated as
    -- absent, and overwritten if the call writes the bucket.
    local s, ns, x, c, w
    if #v == 40 then
      s, ns, x, c, w = struct.unpack('<ddddd', v)
    end
    if s and ns >= 0 and ns < 1e9 and x >= 0 and x <= MAXB and c >= 1 and w >= 0 and s == math.floor(s) then
      local r = { s, ns, x, c, w }
      rec[i] = r
      if r[1] > now_s or (r[1] == now_s and r[2] > now_ns) then
        now_s, now_ns = r[1], r[2]
      end
    end
  end
end

-- Exact non-negative integers of any size, as little-endian arrays of 24-bit
-- limbs: a limb product is below 2^48, so a product row with its carry stays
-- exact in a double.
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

local function mul(a, b)
  local r = {}
  for k = 1, #a + #b do r[k] = 0 end
  for i = 1, #a do
    local carry = 0
    for j = 1, #b do
      local t = r[i + j - 1] + a[i] * b[j] + carry
      local lo = t % BASE
      r[i + j - 1] = lo
      carry = (t - lo) / BASE
    end
    r[i + #b] = carry
  end
  return r
end

local function cmp(a, b)
  for k = math.max(#a, #b), 1, -1 do
    local x, y = a[k] or 0, b[k] or 0
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
  end
  return 0
end

-- rescale converts a backlog of b ns at count co per window wo to the same
-- units at cn per wn: ceil(b*co*wn / (wo*cn)), capped at MAXB, exactly as
-- rescale in limit.go. A double estimate is within a few ns of the answer;
-- the exact comparisons then step to the smallest x with x*wo*cn >= b*co*wn.
-- It runs once per bucket per limit change, so its cost does not matter.
local function rescale(b, co, wo, cn, wn)
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
-- per distinct key holds its level (v) and the limit it is under (c, w),
-- and every charge on the key works on that slot.
local slots, byKey = {}, {}
local slotOf, count, window, xs, tols = {}, {}, {}, {}, {}
for i = 1, n do
  local sl = byKey[KEYS[i]]
  if not sl then
    sl = { key = KEYS[i], v = 0, stored = rec[i] ~= nil }
    local r = rec[i]
    if r and r[5] == 0 then
      sl.v, sl.c, sl.w = r[3], r[4], 0
    elseif r then
      -- The backlog drains with time. Past 4.6e6 s (more than MAXB ns) any
      -- backlog has drained, and below it ds * 1e9 is exact.
      local ds = now_s - r[1]
      if ds < 4600000 then
        sl.v = r[3] - (ds * 1e9 + (now_ns - r[2]))
        if sl.v < 0 then sl.v = 0 end
      end
      sl.c, sl.w = r[4], r[5]
    end
    byKey[KEYS[i]] = sl
    slots[#slots + 1] = sl
  end
  slotOf[i] = sl

  local c, w, x, tol = struct.unpack('<dddd', PACKED, (i - 1) * 32 + 1)
  count[i], window[i] = c, w
  xs[i], tols[i] = x, tol
  -- Bring the level under the charge's limit (MemoryStore's load).
  if not sl.c then
    -- No bucket yet: one written by this call is under this limit.
    sl.c, sl.w = c, w
  elseif (sl.w == 0) ~= (w == 0) then
    -- Last used under the other kind of limit, whose level means nothing
    -- to this one: the bucket starts empty (a rate bucket full, a
    -- concurrency bucket holding nothing).
    sl.v, sl.c, sl.w, sl.dirty = 0, c, w, true
  elseif w == 0 then
    -- What is held stays held, whatever the new count says.
    sl.c = c
  elseif sl.c ~= c or sl.w ~= w then
    if sl.v > 0 then sl.v = rescale(sl.v, sl.c, sl.w, c, w) end
    sl.c, sl.w, sl.dirty = c, w, true
  end
end

-- charge applies charge i's x to its slot: debts saturate at MAXB; a refund
-- cannot fill a rate bucket beyond full nor give a concurrency bucket credit.
local function charge(i)
  local x = xs[i]
  if x ~= 0 then
    local sl = slotOf[i]
    local v = sl.v + x
    if v < 0 then v = 0 end
    if v > MAXB then v = MAXB end
    sl.v, sl.dirty = v, true
  end
end

-- out[i] is the level of charge i's bucket once the charge is applied (or
-- not): what its state is reported from.
local allowed, wait, limiting = 1, 0, -1
local out = {}
if op == 'r' then
  -- The decision of MemoryStore.Reserve: every rate bucket's wait for its
  -- charge to conform, the request waiting for the slowest; a concurrency
  -- bucket without room refuses whatever maxWait says.
  local full = -1
  for i = 1, n do
    local x, v = xs[i], slotOf[i].v
    if window[i] == 0 then
      if full < 0 and x > 0 and v > 0 and v + x > count[i] then full = i - 1 end
    elseif x > 0 then
      -- A charge larger than the capacity conforms once the bucket is full.
      local tol = tols[i]
      if x > tol then x = tol end
      local w = v - tol + x
      if w > wait then wait, limiting = w, i - 1 end
    end
  end
  if full >= 0 or wait > maxwait then allowed = 0 end
  if full >= 0 then limiting = full end
  for i = 1, n do
    if allowed == 1 then charge(i) end
    out[i] = slotOf[i].v
  end
else
  -- Adjust applies signed corrections without any check; Peek changes
  -- nothing.
  for i = 1, n do
    if op == 'a' then charge(i) end
    out[i] = slotOf[i].v
  end
end

-- Write what changed. Numbers are formatted with '%.0f', which prints an
-- integral double exactly (Lua's default conversion keeps 14 digits).
for _, sl in ipairs(slots) do
  if sl.dirty then
    local v = sl.v
    if v > 0 then
      -- A rate bucket expires when it would be full again, plus the slack;
      -- a concurrency bucket after a fixed time, refreshed by every write.
      local ttl = conc_ttl
      if sl.w ~= 0 then ttl = string.format('%.0f', math.ceil(v / 1e6) + slack_ms) end
      redis.call('SET', sl.key,
        struct.pack('<ddddd', now_s, now_ns, v, sl.c, sl.w),
        'PX', ttl)
    elseif sl.stored then
      -- Full, or holding nothing: the same as no bucket at all.
      redis.call('DEL', sl.key)
    end
  end
end

local res = { allowed, wait, limiting }
for i = 1, n do res[3 + i] = out[i] end
return res
