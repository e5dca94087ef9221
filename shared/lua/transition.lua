-- Moves a prediction from one of O.from to O.to, with its job's counters, the backpressure sets,
-- the job's results list, its rate, the done notification and the webhook events, all at once.
-- KEYS: 1 prediction, 2 image, 3 pending, 4 webhook outbox ('' = no webhook events)
-- O: id, to, from (list), now, bump (count a delivery in 'attempts'), fields (set with the status),
--    event (the prediction's webhook event)
-- The job's keys come from M.tpl: the job ID is only learned here, from the record.
-- Returns {'ok' | 'skip' (status not in O.from) | 'missing', previous status, attempts}.
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', '', '0'} end
local attempts = redis.call('HGET', KEYS[1], 'attempts') or '0'
local allowed = false
for _, s in ipairs(O.from) do if s == cur then allowed = true end end
if not allowed then return {'skip', cur, attempts} end
local to, id = O.to, O.id
if O.bump then attempts = tostring(redis.call('HINCRBY', KEYS[1], 'attempts', 1)) end
redis.call('HSET', KEYS[1], 'status', to)
hset_fields(KEYS[1], O.fields)
local terminal = false
for _, s in ipairs(M.terminal) do if s == to then terminal = true end end
local job = redis.call('HGET', KEYS[1], 'job_id')
if job and job ~= '' and cur ~= to then
  local jk = fill(M.tpl.job, job)
  redis.call('HINCRBY', jk, cur, -1)
  redis.call('HINCRBY', jk, to, 1)
  if terminal then
    redis.call('ZREM', fill(M.tpl.job_pending, job), id)
    redis.call('RPUSH', fill(M.tpl.job_done, job), id)
    local rate = fill(M.tpl.job_rate, job)
    redis.call('HINCRBY', rate, math.floor(tonumber(O.now) / M.ttl.rate_bucket), 1)
    redis.call('EXPIRE', rate, M.ttl.rate)
    local h = redis.call('HMGET', jk, 'status', M.st.queued, M.st.running)
    if h[1] == M.job.closed and tonumber(h[2] or '0') <= 0 and tonumber(h[3] or '0') <= 0 then
      redis.call('HSET', jk, 'status', M.job.finished, 'finished_at', O.now)
      if KEYS[4] ~= '' and redis.call('HEXISTS', jk, 'webhook') == 1 then
        redis.call('HSET', jk, 'webhook_status', M.webhook.pending)
        redis.call('RPUSH', KEYS[4], fill(M.tpl.job_event, job))
      end
    end
  end
end
if terminal then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], id)
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and owner ~= '' then redis.call('ZREM', fill(M.tpl.key_pending, owner), id) end
  redis.call('EXPIRE', KEYS[1], M.ttl.result)
  redis.call('PUBLISH', M.done_channel, id)
  if cur ~= to and KEYS[4] ~= '' and redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('HSET', KEYS[1], 'webhook_status', M.webhook.pending)
    redis.call('RPUSH', KEYS[4], O.event)
  end
end
return {'ok', cur, attempts}
