-- The first request with a key claims it (pending for M.ttl.idem_pending); later ones get the
-- record to replay or refuse.
-- KEYS: 1 idempotency record.  O: fingerprint (of the request).
-- Returns {'new'} | {'seen', fingerprint, state, status, body, location, id}.
if redis.call('HSETNX', KEYS[1], 'fingerprint', O.fingerprint) == 1 then
  redis.call('HSET', KEYS[1], 'state', M.idem.pending)
  redis.call('EXPIRE', KEYS[1], M.ttl.idem_pending)
  return {'new'}
end
return idempotency_seen(KEYS[1])
