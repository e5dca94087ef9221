-- The first request with a key claims it (pending for M.ttl.idem_pending); later ones get the
-- record to replay or refuse.
-- KEYS: 1 idempotency record.  O: fingerprint (of the request).
-- Returns {'new'} | {'seen', fingerprint, state, status, body, location, id}.
if redis.call('HSETNX', KEYS[1], 'fingerprint', O.fingerprint) == 1 then
  redis.call('HSET', KEYS[1], 'state', M.idem.pending)
  redis.call('EXPIRE', KEYS[1], M.ttl.idem_pending)
  return {'new'}
end
local h = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'status', 'body', 'location', 'id')
return {'seen', h[1] or '', h[2] or '', h[3] or '', h[4] or '', h[5] or '', h[6] or ''}
