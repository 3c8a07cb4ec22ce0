"""The Lua scripts behind router/health.py: each change to a health or key-state hash is one atomic call."""

# KEYS: health hash, probe key. ARGV: now_ms, threshold, base_ms, max_ms, ttl_ms, is_probe (1/0),
# jitter (0 < j <= 1). A failure while the breaker is open, or after it lapsed from a request that
# is not the probe (it started before the breaker opened), only counts; a failed probe reopens it
# for twice as long, never longer than max_ms. The open period is the cooldown times the jitter, so
# breakers opened together do not all lapse (and get probed) in the same instant.
RECORD_FAILURE = """
local now = tonumber(ARGV[1])
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until_ms') or '0')
local cooldown = tonumber(redis.call('HGET', KEYS[1], 'cooldown_ms') or '0')
local opened = 0
if open_until > 0 and open_until <= now and ARGV[6] == '1' then
  cooldown = math.min(math.max(cooldown * 2, tonumber(ARGV[3])), tonumber(ARGV[4]))
  opened = 1
elseif open_until == 0 and fails >= tonumber(ARGV[2]) then
  cooldown = math.min(tonumber(ARGV[3]), tonumber(ARGV[4]))
  opened = 1
end
if opened == 1 then
  local open_for = math.max(math.floor(cooldown * tonumber(ARGV[7])), 1)
  redis.call('HSET', KEYS[1], 'open_until_ms', now + open_for, 'cooldown_ms', cooldown)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {fails, opened, cooldown}
"""

# KEYS: health hash, probe key. ARGV: latency_ms (or -1), alpha, ttl_ms. Closes the breaker and
# folds the time to the first token into its weighted mean and variance (incremental form).
RECORD_SUCCESS = """
local latency = tonumber(ARGV[1])
if latency >= 0 then
  local alpha = tonumber(ARGV[2])
  local ewma = tonumber(redis.call('HGET', KEYS[1], 'ewma_ms') or '-1')
  local var = tonumber(redis.call('HGET', KEYS[1], 'ttft_var_ms2') or '0')
  if ewma < 0 then
    ewma = latency
    var = 0
  else
    local diff = latency - ewma
    ewma = ewma + alpha * diff
    var = (1 - alpha) * (var + alpha * diff * diff)
  end
  redis.call('HSET', KEYS[1], 'ewma_ms', tostring(ewma), 'ttft_var_ms2', tostring(var))
end
redis.call('HSET', KEYS[1], 'fails', 0, 'open_until_ms', 0, 'cooldown_ms', 0)
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: health hash. ARGV: now_ms, field, until_ms, ttl_ms, max_marks, mark prefix. A deployment's marks
# (UNSUPPORTED_PREFIX fields) are read with every claim: lapsed ones go, and past max_marks live
# ones a new one is not written (a caller cannot grow the hash with made-up field names).
MARK = """
local now = tonumber(ARGV[1])
local live = 0
local fields = redis.call('HKEYS', KEYS[1])
for _, name in ipairs(fields) do
  if string.sub(name, 1, #ARGV[6]) == ARGV[6] and name ~= ARGV[2] then
    if tonumber(redis.call('HGET', KEYS[1], name) or '0') <= now then
      redis.call('HDEL', KEYS[1], name)
    else
      live = live + 1
    end
  end
end
if live >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: a key-state (or health) hash. ARGV: field, until_ms, ttl_ms. Never moves a park earlier:
# two workers told different waits (a day cap and a minute's) keep the longer one.
PARK = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
