"""Server-side scripts: every status change is one atomic step in Redis.

A prediction's status, its job's counters, the backpressure sets, the job's results list and the
"done" notification change together or not at all, so counts always add up, an image is counted as
finished exactly once (however many times it is delivered), and no reader sees half a transition.
Key names are passed in (built by ``shared.keys``); job keys are derived from the prefix passed in
ARGV because a prediction only learns its job ID inside the script (single-node Redis, no cluster).
"""

# KEYS: 1 pending, 2 pred, 3 image, 4 job, 5 job_pending, 6 job_items, 7 job_names, 8 job_done,
#       9 interactive-recent marker ('' for bulk), 10 the API key's pending set ('' without keys),
#       11 webhook outbox ('' without a webhook)
# ARGV: 1 id, 2 now, 3 max_pending, 4 image_ttl, 5 result_ttl, 6 bytes, 7 job_max_pending,
#       8 name, 9 status ('queued', 'failed' for an image rejected at submit, 'succeeded' for a cache hit),
#       10 interactive window seconds, 11.. field pairs; the API key's bound is the field pair
#       'key_max_pending' (read here, not stored)
SUBMIT = """
local id, now = ARGV[1], tonumber(ARGV[2])
local has_job = KEYS[4] ~= ''
if has_job then
  local st = redis.call('HGET', KEYS[4], 'status')
  if not st then return {'no_job'} end
  if st ~= 'open' then return {'job_' .. st} end
  local existing = redis.call('HGET', KEYS[7], ARGV[8])
  if existing then return {'duplicate', existing} end
end
local status = ARGV[9]
if status == 'queued' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return {'overloaded', 'global'} end
  if has_job then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
    if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[7]) then return {'overloaded', 'job'} end
  end
  if KEYS[10] and KEYS[10] ~= '' then
    local key_max = 0
    for i = 11, #ARGV, 2 do if ARGV[i] == 'key_max_pending' then key_max = tonumber(ARGV[i + 1]) end end
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now)
    if redis.call('ZCARD', KEYS[10]) >= key_max then return {'overloaded', 'key'} end
    redis.call('ZADD', KEYS[10], now + tonumber(ARGV[4]), id)
  end
  local expires = now + tonumber(ARGV[4])
  redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[4])
  redis.call('ZADD', KEYS[1], expires, id)
  if has_job then redis.call('ZADD', KEYS[5], expires, id) end
end
local fields = {}
for i = 11, #ARGV, 2 do
  if ARGV[i] ~= 'key_max_pending' then fields[#fields + 1] = ARGV[i]; fields[#fields + 1] = ARGV[i + 1] end
end
redis.call('HSET', KEYS[2], 'status', status, unpack(fields))
redis.call('EXPIRE', KEYS[2], ARGV[5])
if KEYS[9] ~= '' then redis.call('SET', KEYS[9], '1', 'EX', ARGV[10]) end
if has_job then
  redis.call('RPUSH', KEYS[6], id)
  redis.call('HSET', KEYS[7], ARGV[8], id)
  redis.call('HINCRBY', KEYS[4], 'total', 1)
  redis.call('HINCRBY', KEYS[4], status, 1)
  if status ~= 'queued' then redis.call('RPUSH', KEYS[8], id) end
  for i = 5, 8 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
if status ~= 'queued' and (KEYS[11] or '') ~= '' and redis.call('HEXISTS', KEYS[2], 'webhook') == 1 then
  redis.call('HSET', KEYS[2], 'webhook_status', 'pending')  -- terminal at once (a cache hit): tell now
  redis.call('RPUSH', KEYS[11], 'p:' .. id)
end
return {'ok'}
"""

# KEYS: 1 pred, 2 image, 3 pending, 4 webhook outbox ('' = no webhook events)
# ARGV: 1 id, 2 to, 3 allowed-from (comma separated), 4 now, 5 job key prefix, 6 done channel,
#       7 result_ttl, 8 bump attempts ('1'/'0'), 9 rate bucket seconds, 10.. field pairs
TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', '', '0'} end
local attempts = redis.call('HGET', KEYS[1], 'attempts') or '0'
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {'skip', cur, attempts} end
local to = ARGV[2]
if ARGV[8] == '1' then attempts = tostring(redis.call('HINCRBY', KEYS[1], 'attempts', 1)) end
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'status', to, unpack(fields))
local terminal = (to == 'succeeded' or to == 'failed' or to == 'canceled')
local job = redis.call('HGET', KEYS[1], 'job_id')
if job and job ~= '' and cur ~= to then
  local jk = ARGV[5] .. job
  redis.call('HINCRBY', jk, cur, -1)
  redis.call('HINCRBY', jk, to, 1)
  if terminal then
    redis.call('ZREM', jk .. ':pending', ARGV[1])
    redis.call('RPUSH', jk .. ':done', ARGV[1])
    local bucket = math.floor(tonumber(ARGV[4]) / tonumber(ARGV[9]))
    redis.call('HINCRBY', jk .. ':rate', bucket, 1)
    redis.call('EXPIRE', jk .. ':rate', 300)
    local h = redis.call('HMGET', jk, 'status', 'queued', 'running')
    if h[1] == 'closed' and tonumber(h[2] or '0') <= 0 and tonumber(h[3] or '0') <= 0 then
      redis.call('HSET', jk, 'status', 'finished', 'finished_at', ARGV[4])
      if (KEYS[4] or '') ~= '' and redis.call('HEXISTS', jk, 'webhook') == 1 then
        redis.call('HSET', jk, 'webhook_status', 'pending')
        redis.call('RPUSH', KEYS[4], 'j:' .. job)
      end
    end
  end
end
if terminal then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and owner ~= '' then redis.call('ZREM', KEYS[3] .. ':' .. owner, ARGV[1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('PUBLISH', ARGV[6], ARGV[1])
  if cur ~= to and (KEYS[4] or '') ~= '' and redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending')
    redis.call('RPUSH', KEYS[4], 'p:' .. ARGV[1])
  end
end
return {'ok', cur, attempts}
"""

# KEYS: the records of the images about to be decoded and run in one forward pass.
# ARGV: 1 the running status, 2 '1' when the pass holds one image alone.
# Charges a run to each image still running: if the process dies now, these (and only these) were in
# flight. A record that expired or finished meanwhile is left alone (HINCRBY would recreate it).
MARK_IN_FLIGHT = """
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == ARGV[1] then
    redis.call('HINCRBY', KEYS[i], 'runs', 1)
    if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[i], 'alone_runs', 1) end
  end
end
return #KEYS
"""

# KEYS: 1 job, 2 webhook outbox.  ARGV: 1 now.  Open -> closed (-> finished when nothing is left).
CLOSE_JOB = """
local h = redis.call('HMGET', KEYS[1], 'status', 'queued', 'running')
if not h[1] then return 'missing' end
if h[1] ~= 'open' then return h[1] end
redis.call('HSET', KEYS[1], 'status', 'closed', 'closed_at', ARGV[1])
if tonumber(h[2] or '0') <= 0 and tonumber(h[3] or '0') <= 0 then
  redis.call('HSET', KEYS[1], 'status', 'finished', 'finished_at', ARGV[1])
  if (KEYS[2] or '') ~= '' and redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending')
    redis.call('RPUSH', KEYS[2], 'j:' .. string.sub(KEYS[1], string.len(ARGV[2]) + 1))
  end
  return 'finished'
end
return 'closed'
"""

# KEYS: 1 core leases hash.  ARGV: 1 holder, 2 now, 3 lease seconds, 4.. candidate cores.
# A core is free when unleased or its lease expired; the holder keeps a core it already has.
LEASE_CORE = """
local now = tonumber(ARGV[2])
for i = 4, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local holder, exp = string.match(v, '^(.*)|([%d%.]+)$')
    if holder == ARGV[1] or tonumber(exp) < now then v = nil end
  end
  if not v then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1] .. '|' .. (now + tonumber(ARGV[3])))
    return ARGV[i]
  end
end
return false
"""

# Webhook delivery. KEYS: 1 outbox, 2 retry (due time), 3 in flight (lease expiry).
# ARGV: 1 now, 2 lease seconds. Moves due retries and expired leases (their deliverer died) back to
# the outbox, then claims the oldest event with a lease. Returns the event or false.
WEBHOOK_CLAIM = """
for _, k in ipairs({KEYS[2], KEYS[3]}) do
  local due = redis.call('ZRANGEBYSCORE', k, '-inf', ARGV[1], 'LIMIT', 0, 100)
  for _, ev in ipairs(due) do
    redis.call('ZREM', k, ev)
    redis.call('RPUSH', KEYS[1], ev)
  end
end
local ev = redis.call('LPOP', KEYS[1])
if not ev then return false end
redis.call('ZADD', KEYS[3], tonumber(ARGV[1]) + tonumber(ARGV[2]), ev)
return ev
"""

# KEYS: 1 cache index.  ARGV: 1 now, 2 ttl, 3 max entries, 4 key prefix of entries,
#       5.. (digest, result JSON) pairs.
# Stores results for reuse and keeps the cache within its bound (Redis runs noeviction, so the
# cache must make room itself): expired index entries are dropped, then the oldest beyond the bound.
CACHE_PUT = """
local now, ttl, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('SET', ARGV[4] .. ARGV[i], ARGV[i + 1], 'EX', ttl)
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local over = redis.call('ZCARD', KEYS[1]) - max
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #old, 2 do redis.call('DEL', ARGV[4] .. old[i]) end
end
redis.call('EXPIRE', KEYS[1], ttl)
return over
"""

# KEYS: 1 idempotency record.  ARGV: 1 request fingerprint, 2 seconds a pending claim lives.
# The first request with a key claims it ('new'); later ones get the record to replay or refuse.
IDEMPOTENCY_BEGIN = """
if redis.call('HSETNX', KEYS[1], 'fingerprint', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'pending')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'new'}
end
local h = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'status', 'body', 'location')
return {'seen', h[1] or '', h[2] or '', h[3] or '', h[4] or '', h[5] or ''}
"""
