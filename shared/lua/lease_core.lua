-- A core is free when unleased or its lease expired; the holder keeps a core it already has.
-- KEYS: 1 core leases hash.  O: holder, now, lease_s, cores (candidates, in order of preference).
-- Returns the core leased, or false.
local now = tonumber(O.now)
for _, core in ipairs(O.cores) do
  local c = tostring(core)
  local v = redis.call('HGET', KEYS[1], c)
  if v then
    local holder, exp = string.match(v, '^(.*)|([%d%.]+)$')
    if holder == O.holder or tonumber(exp) < now then v = nil end
  end
  if not v then
    redis.call('HSET', KEYS[1], c, O.holder .. '|' .. (now + O.lease_s))
    return c
  end
end
return false
