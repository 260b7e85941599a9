-- One tenant's plan: its token bucket and every calendar quota window, decided and taken atomically.
--
-- KEYS[1]   the tenant's bucket (a hash: t = tokens, s = stamp in microseconds), as ratelimit.lua
-- KEYS[2..] one counter per quota window of the plan (admitted requests in that window; the
--           window's id is part of the key, so a new window starts at 0)
-- ARGV[1]   now in microseconds, or "" for the Redis server's TIME (production)
-- ARGV[2]   rate in tokens per second ("0": the plan has no rate limit; KEYS[1] is not touched)
-- ARGV[3]   capacity of the bucket (burst + 1)
-- ARGV[4]   "1" to take when admitted, "0" to only look
-- ARGV[3+2i], ARGV[4+2i]  for window i (i = 1..#KEYS-1): its quota, and the unix second at which
--           its counter may expire (the window's end plus a margin for gateway clock skew)
--
-- Returns {admitted (1/0), tokens before taking (a string; "-1" without a bucket), count_1, ...}:
-- the counts are the windows' admitted requests before this one. All or nothing: a request the
-- bucket or any window refuses takes nothing anywhere, so a window never counts more than its
-- quota, whatever the number of gateways and clients.

local EPS = 1e-9
local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local rate = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local consume = ARGV[4] == "1"
local admitted = true

local tok = -1
local stamp = now
if rate > 0 then
  local state = redis.call("HMGET", KEYS[1], "t", "s")
  tok = cap
  if state[1] then
    tok = tonumber(state[1])
    stamp = tonumber(state[2])
    if now > stamp then
      tok = math.min(cap, tok + (now - stamp) / 1000000 * rate)
      stamp = now
    end
  end
  if tok < 1 - EPS then
    admitted = false
  end
end

local out = {0, string.format("%.17g", tok)}
for i = 2, #KEYS do
  local c = tonumber(redis.call("GET", KEYS[i]) or "0")
  out[i + 1] = c
  if c + 1 > tonumber(ARGV[3 + 2 * (i - 1)]) then
    admitted = false
  end
end

if admitted then
  out[1] = 1
  if consume then
    if rate > 0 then
      local left = math.max(0, tok - 1)
      redis.call("HSET", KEYS[1], "t", string.format("%.17g", left), "s",
                 string.format("%.17g", stamp))
      redis.call("PEXPIRE", KEYS[1], math.ceil((cap - left) / rate * 1000) + 1000)
    end
    for i = 2, #KEYS do
      if redis.call("INCR", KEYS[i]) == 1 then
        redis.call("EXPIREAT", KEYS[i], tonumber(ARGV[4 + 2 * (i - 1)]))
      end
    end
  end
end
return out
