-- Stores results for reuse and keeps the cache within its bound (Redis runs noeviction, so the
-- cache must make room itself): expired index entries are dropped, then the oldest beyond the bound.
-- KEYS: 1 cache index.  O: now, entries (list of {digest, result JSON}).
-- Entry keys come from M.tpl.cache: evicted ones are only known by the digests in the index.
local now, ttl, max = tonumber(O.now), M.ttl.cache, M.cache_max_entries
for _, e in ipairs(O.entries) do
  redis.call('SET', fill(M.tpl.cache, e[1]), e[2], 'EX', ttl)
  redis.call('ZADD', KEYS[1], now, e[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local over = redis.call('ZCARD', KEYS[1]) - max
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #old, 2 do redis.call('DEL', fill(M.tpl.cache, old[i])) end
end
redis.call('EXPIRE', KEYS[1], ttl)
return over
