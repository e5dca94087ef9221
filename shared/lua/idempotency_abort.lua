-- Forgets a claim whose request failed, so a retry runs it again; but only while it is still
-- pending: once the creating script recorded an ID, a retry must get that ID, not a second one.
-- KEYS: 1 idempotency record.  Returns 1 when forgotten.
if redis.call('HGET', KEYS[1], 'state') == M.idem.pending then return redis.call('DEL', KEYS[1]) end
return 0
