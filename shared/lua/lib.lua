-- Prepended to every script by shared/lua/__init__.py.
-- ARGV[1] is the data model, the same JSON for every script (Store builds it once from shared.keys,
-- shared.schema and the settings): statuses (M.st), key and event templates (M.tpl), TTLs (M.ttl)
-- and the done channel. No script spells a key, a status or a TTL of its own.
-- ARGV[2] is this call's options, a JSON object of named fields.
local M = cjson.decode(ARGV[1])
local O = cjson.decode(ARGV[2])

-- A key (or event name) from one of M.tpl's templates: '{}' replaced by id (a plain find, no pattern).
-- Used where the ID is only learned inside the script (a record's job_id, owner or a cache digest).
local function fill(tpl, id)
  local i = string.find(tpl, '{}', 1, true)
  return string.sub(tpl, 1, i - 1) .. id .. string.sub(tpl, i + 2)
end

-- HSET of a {field = string} table.
local function hset_fields(key, fields)
  local flat = {}
  for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end

-- The reply about an Idempotency-Key already recorded, {'seen', fingerprint, state, status, body,
-- location, id} (shared.store.IDEMPOTENCY_FIELDS), or nil when the key is new.
local function idempotency_seen(key)
  local h = redis.call('HMGET', key, 'fingerprint', 'state', 'status', 'body', 'location', 'id')
  if not h[1] then return nil end
  return {'seen', h[1], h[2] or '', h[3] or '', h[4] or '', h[5] or '', h[6] or ''}
end

-- Records what a request with an Idempotency-Key created (O.idem = {fingerprint, status}), in the
-- script that creates it: a retry after the API process died still finds the same ID. Only under
-- this request's own claim (an expired claim taken by another request is left alone).
local function record_idempotent(key, id)
  if key == '' or not O.idem then return end
  local fp = redis.call('HGET', key, 'fingerprint')
  if fp and fp ~= O.idem.fingerprint then return end
  redis.call('HSET', key, 'fingerprint', O.idem.fingerprint, 'state', M.idem.created, 'id', id,
             'status', O.idem.status)
  redis.call('EXPIRE', key, M.ttl.result)
end
