-- Moves due retries and expired leases (their deliverer died) back to the outbox, then claims the
-- oldest event with a lease.
-- KEYS: 1 outbox, 2 retry (due time), 3 in flight (lease expiry).  O: now, lease_s.
-- Returns the event or false.
local now = tonumber(O.now)
for _, k in ipairs({KEYS[2], KEYS[3]}) do
  local due = redis.call('ZRANGEBYSCORE', k, '-inf', now, 'LIMIT', 0, M.webhook_move_max)
  for _, ev in ipairs(due) do
    redis.call('ZREM', k, ev)
    redis.call('RPUSH', KEYS[1], ev)
  end
end
local ev = redis.call('LPOP', KEYS[1])
if not ev then return false end
redis.call('ZADD', KEYS[3], now + O.lease_s, ev)
return ev
