-- Creates a job record, lists it in the jobs index (trimmed to the life of a job record) and, with an
-- Idempotency-Key, records the job's ID under it in the same step.
-- KEYS: 1 job, 2 jobs index, 3 idempotency record ('' without a key).
-- O: id, now, fields (the record), idem ({fingerprint, status} with an Idempotency-Key).
redis.call('HSET', KEYS[1], 'status', M.job.open)
hset_fields(KEYS[1], O.fields)
redis.call('EXPIRE', KEYS[1], M.ttl.result)
redis.call('ZADD', KEYS[2], tonumber(O.now), O.id)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(O.now) - M.ttl.result)
record_idempotent(KEYS[3], O.id)
return 'ok'
