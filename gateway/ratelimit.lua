-- Token buckets for every Redis-backed policy of one route: refill, decide, take — atomically.
--
-- KEYS[i]   the bucket of policy i for this client (a hash: t = tokens, s = stamp in whole
--           microseconds: exact in a double, so elapsed times carry no rounding at 1.7e9 s)
-- ARGV[1]   now in microseconds, or "" to use the Redis server's clock (TIME). Production sends
--           "": every gateway shares one clock, so skew between gateway hosts cannot mint tokens.
--           Tests send a fake time; then expiry is stretched to >= 60 s because key expiry runs
--           on the server's real clock, not on the fake one.
-- ARGV[2]   cost: tokens one admission takes (1 for a request)
-- ARGV[3]   "1" to take tokens when admitted, "0" to only look (POST /admin/limits/test)
-- ARGV[3+3i-2 .. 3+3i]  rate (tokens/s), capacity, "1" if the policy is enforced ("0": shadow;
--           "d<debt>": enforced and throttling: a take may leave the bucket down to -debt tokens,
--           reserving a token that arrives later; the gateway holds the request until then)
--
-- Returns {admitted (1/0), tokens_1, ..., tokens_n}: the tokens each bucket held after refill and
-- before taking, as strings (Redis would truncate Lua numbers to integers).
--
-- All-or-nothing: admitted only if every enforced bucket holds `cost` tokens; then `cost` is taken
-- from every bucket that holds it (a shadow bucket that is short is left alone). Rejections write
-- nothing: refill is a pure function of (tokens, stamp, now), so the stored state stays valid.
-- A written key expires when its bucket would be full again: a missing key means a full bucket.

local EPS = 1e-9
local now
local fake = ARGV[1] ~= ""
if fake then
  now = tonumber(ARGV[1])
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[2])
local consume = ARGV[3] == "1"

local n = #KEYS
local tokens = {}
local stamps = {}
local debts = {}
local admitted = true
for i = 1, n do
  local base = 3 + (i - 1) * 3
  local rate = tonumber(ARGV[base + 1])
  local cap = tonumber(ARGV[base + 2])
  local state = redis.call("HMGET", KEYS[i], "t", "s")
  local tok = cap
  local stamp = now
  if state[1] then
    tok = tonumber(state[1])
    stamp = tonumber(state[2])
    if now > stamp then
      tok = math.min(cap, tok + (now - stamp) / 1000000 * rate)
      stamp = now
    end
  end
  tokens[i] = tok
  stamps[i] = stamp
  local mode = ARGV[base + 3]
  local debt = 0
  if string.sub(mode, 1, 1) == "d" then
    debt = tonumber(string.sub(mode, 2))
  end
  debts[i] = debt
  if mode ~= "0" and tok < cost - debt - EPS then
    admitted = false
  end
end

local out = {admitted and 1 or 0}
for i = 1, n do
  local tok = tokens[i]
  if admitted and consume and tok >= cost - debts[i] - EPS then
    local base = 3 + (i - 1) * 3
    local rate = tonumber(ARGV[base + 1])
    local cap = tonumber(ARGV[base + 2])
    local left = tok - cost
    if debts[i] == 0 then
      left = math.max(0, left)
    end
    redis.call("HSET", KEYS[i], "t", string.format("%.17g", left), "s",
               string.format("%.17g", stamps[i]))
    local ttl = math.ceil((cap - left) / rate * 1000) + 1
    if fake and ttl < 60000 then
      ttl = 60000
    end
    redis.call("PEXPIRE", KEYS[i], ttl)
  end
  out[i + 1] = string.format("%.17g", tok)
end
return out
