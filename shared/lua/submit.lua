-- Stores one image and its record (and the job's bookkeeping) if the backpressure bounds allow it.
-- KEYS: 1 pending, 2 prediction, 3 image, 4 job ('' for a single image), 5 job pending, 6 job items,
--       7 job names, 8 job done, 9 interactive-recent marker ('' unless a queued interactive image),
--       10 the API key's pending set ('' without API keys), 11 webhook outbox ('' without a webhook),
--       12 idempotency record ('' without an Idempotency-Key), 13 the lane's broker queue ('' when
--       nothing is queued, or no message was built: the sweeper publishes it then)
-- O: id, now, status (queued | failed: rejected at submit | succeeded: a result cache hit), name (in
--    the job), key_max_pending, fields (the record's other fields), event (its webhook event),
--    idem ({fingerprint, status} with an Idempotency-Key)
-- ARGV[3]: the image bytes ('' when nothing is stored). ARGV[4]: the task message (shared.broker), pushed
--   onto KEYS[13] as kombu would (LPUSH; the consumer pops from the other end) once all is stored.
-- Returns {'ok'} | {'seen', fingerprint, state, status, body, location, id} (the Idempotency-Key is
-- known: nothing is created) | {'duplicate', id} | {'overloaded', scope} | {'no_job'} | {'job_' .. status}.
local id, now, status = O.id, tonumber(O.now), O.status
if KEYS[12] ~= '' and O.idem then  -- claimed and created in one step: no window for a second request
  local seen = idempotency_seen(KEYS[12])
  if seen then return seen end
end
local has_job = KEYS[4] ~= ''
if has_job then
  local st = redis.call('HGET', KEYS[4], 'status')
  if not st then return {'no_job'} end
  if st ~= M.job.open then return {'job_' .. st} end
  local existing = redis.call('HGET', KEYS[7], O.name)
  if existing then return {'duplicate', existing} end
end
if status == M.st.queued then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= M.max_pending then return {'overloaded', 'global'} end
  if has_job then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
    if redis.call('ZCARD', KEYS[5]) >= M.job_max_pending then return {'overloaded', 'job'} end
  end
  local expires = now + M.ttl.image
  if KEYS[10] ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now)
    if redis.call('ZCARD', KEYS[10]) >= O.key_max_pending then return {'overloaded', 'key'} end
    redis.call('ZADD', KEYS[10], expires, id)
  end
  redis.call('SET', KEYS[3], ARGV[3], 'EX', M.ttl.image)
  redis.call('ZADD', KEYS[1], expires, id)
  if has_job then redis.call('ZADD', KEYS[5], expires, id) end
end
redis.call('HSET', KEYS[2], 'status', status)
hset_fields(KEYS[2], O.fields)
redis.call('EXPIRE', KEYS[2], M.ttl.result)
if KEYS[9] ~= '' then redis.call('SET', KEYS[9], '1', 'EX', M.ttl.interactive) end
if status == M.st.queued and KEYS[13] ~= '' then
  redis.call('HSET', KEYS[2], 'enqueued_at', O.now)
  redis.call('LPUSH', KEYS[13], ARGV[4])
end
if has_job then
  redis.call('RPUSH', KEYS[6], id)
  redis.call('HSET', KEYS[7], O.name, id)
  redis.call('HINCRBY', KEYS[4], 'total', 1)
  redis.call('HINCRBY', KEYS[4], status, 1)
  if status ~= M.st.queued then redis.call('RPUSH', KEYS[8], id) end
  for i = 5, 8 do redis.call('EXPIRE', KEYS[i], M.ttl.result) end
end
record_idempotent(KEYS[12], id)
if status ~= M.st.queued then  -- terminal at once (rejected, or a cache hit): tell now
  if KEYS[11] ~= '' and redis.call('HEXISTS', KEYS[2], 'webhook') == 1 then
    redis.call('HSET', KEYS[2], 'webhook_status', M.webhook.pending)
    redis.call('RPUSH', KEYS[11], O.event)
  end
  redis.call('PUBLISH', M.done_channel, id)
end
return {'ok'}
