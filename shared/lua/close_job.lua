-- Open -> closed, and -> finished at once when nothing is left to classify.
-- KEYS: 1 job, 2 webhook outbox.  O: now, event (the job's webhook event).
-- Returns the job's status afterwards, or 'missing'.
local h = redis.call('HMGET', KEYS[1], 'status', M.st.queued, M.st.running)
if not h[1] then return 'missing' end
if h[1] ~= M.job.open then return h[1] end
redis.call('HSET', KEYS[1], 'status', M.job.closed, 'closed_at', O.now)
if tonumber(h[2] or '0') <= 0 and tonumber(h[3] or '0') <= 0 then
  redis.call('HSET', KEYS[1], 'status', M.job.finished, 'finished_at', O.now)
  if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('HSET', KEYS[1], 'webhook_status', M.webhook.pending)
    redis.call('RPUSH', KEYS[2], O.event)
  end
  return M.job.finished
end
return M.job.closed
