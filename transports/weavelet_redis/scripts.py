"""Lua scripts run atomically on the server (registered with ``register_script``, called by ``EVALSHA``).

Every write that must not interleave with another writer is one script, so no client-side locking or
``WATCH`` retry loop is needed. Redis Cluster is not supported: the scripts touch a run's keys and the shared
run set, which may live in different slots.
"""

from __future__ import annotations

PUT_REVISION = """
-- Compare-and-set of a run's newest revision.
-- KEYS: [1] revisions stream, [2] run hash, [3] run set
-- ARGV: [1] expected current revision, [2] new revision, [3] payload, [4] MAXLEN, [5] run id
-- Returns {1, entry id} when stored, {0, current revision} when the expected revision is not current.
local current = 0
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then
  local fields = newest[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'revision' then
      current = tonumber(fields[i + 1]) or 0
    end
  end
end
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'revision', ARGV[2], 'data', ARGV[3])
redis.call('HSET', KEYS[2], 'revision', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[5])
return {1, id}
"""

PUBLISH_STATUS = """
-- Replace a run's latest status and append it to the run's capped status stream.
-- KEYS: [1] run hash, [2] status stream, [3] run set
-- ARGV: [1] payload, [2] MAXLEN of the status stream, [3] run id
redis.call('HSET', KEYS[1], 'status', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

PUBLISH_OUTCOME = """
-- Store the outcome of one revision; keep only the outcomes of the newest ARGV[3] revisions.
-- KEYS: [1] outcomes hash
-- ARGV: [1] revision, [2] payload, [3] how many to keep
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local keep = tonumber(ARGV[3])
if redis.call('HLEN', KEYS[1]) > keep then
  local numbered = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(field) then
      table.insert(numbered, field)
    end
  end
  table.sort(numbered, function(a, b) return tonumber(a) < tonumber(b) end)
  for i = 1, #numbered - keep do
    redis.call('HDEL', KEYS[1], numbered[i])
  end
end
return 1
"""

__all__ = ["PUBLISH_OUTCOME", "PUBLISH_STATUS", "PUT_REVISION"]
