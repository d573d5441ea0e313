"""Lua scripts run atomically on the server (registered with ``register_script``, called by ``EVALSHA``).

Every write that must not interleave with another writer is one script, so no client-side locking or
``WATCH`` retry loop is needed. A script touches only the keys of one run, which share a hash tag (``{RUN}``) and
so one Redis Cluster slot; the run index is updated by the client after the script (a script touching it too
would fail with ``CROSSSLOT`` on a cluster), except by the status script outside a cluster, which lists the run
with every status in the same round trip.
"""

from __future__ import annotations

NUMBER_SCAN = 64
"""How far back a revision entry without a readable ``revision`` field looks for a numbered one."""

PUT_REVISION = """
-- Compare-and-set of a run's newest revision.
-- KEYS: [1] revisions stream, [2] run hash
-- ARGV: [1] expected current revision, [2] new revision, [3] payload, [4] MAXLEN
-- Returns {1, entry id} when stored, {0, current revision (a string)} when the expected revision is not current.
-- The current revision is the newest entry's 'revision' field, whether or not its payload decodes; an entry
-- without a usable field counts as one more than the nearest numbered entry before it (within 64 entries),
-- exactly as the client numbers it (weavelet_redis.transport.entry_number).
local function numbered(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'revision' and string.match(fields[i + 1], '^[1-9][0-9]*$') then
      return fields[i + 1]
    end
  end
  return nil
end
local current = '0'
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then
  current = numbered(newest[1][2])
  if current == nil then
    newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 65)
    current = tostring(#newest)
    for i = 2, #newest do
      local found = numbered(newest[i][2])
      if found then
        current = string.format('%d', tonumber(found) + i - 1)
        break
      end
    end
  end
end
if current ~= ARGV[1] then
  return {0, current}
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'revision', ARGV[2], 'data', ARGV[3])
redis.call('HSET', KEYS[2], 'revision', ARGV[2])
return {1, id}
"""

NEWEST_REVISIONS = """
-- The newest revision entry of each of many runs (all on this server: never called on a Redis Cluster, where the
-- runs' keys sit in different slots).
-- KEYS: the revisions streams. Returns one string per key: '' when the stream has no entry, else the entry's
-- revision number, a space, and its 'data' field (empty when it has none). Entries are numbered as PUT_REVISION
-- numbers them.
local function numbered(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'revision' and string.match(fields[i + 1], '^[1-9][0-9]*$') then
      return fields[i + 1]
    end
  end
  return nil
end
local found = {}
for k, key in ipairs(KEYS) do
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #newest == 0 then
    found[k] = ''
  else
    local fields = newest[1][2]
    local number = numbered(fields)
    if number == nil then
      local older = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 65)
      number = tostring(#older)
      for i = 2, #older do
        local seen = numbered(older[i][2])
        if seen then
          number = string.format('%d', tonumber(seen) + i - 1)
          break
        end
      end
    end
    local data = ''
    for i = 1, #fields, 2 do
      if fields[i] == 'data' then data = fields[i + 1] end
    end
    found[k] = number .. ' ' .. data
  end
end
return found
"""

STATUSES = """
-- The latest status of each of many runs (all on this server: never called on a Redis Cluster).
-- KEYS: the run hashes. Returns, per key, its 'status' field, or nil when it has none.
local found = {}
for k, key in ipairs(KEYS) do
  found[k] = redis.call('HGET', key, 'status')
end
return found
"""

PUBLISH_STATUS = """
-- Replace a run's latest status, append it to the run's capped status stream and (on one server or a Sentinel's
-- master, where the run index may share a script with the run's keys) list the run in the index. The newest
-- entry's id in the status stream is the status's version; with ARGV[3] (a version), store nothing and return
-- false unless it still is. Every status writer appends to the stream (older weavelets too), and a removal deletes
-- it, so any other write in between changes the version.
-- KEYS: [1] run hash, [2] status stream, [3] the run index (optional: not on a Redis Cluster)
-- ARGV: [1] payload, [2] MAXLEN of the status stream, [3] the version expected, or '' to store whatever is stored,
--       [4] the run id (with KEYS[3])
if ARGV[3] ~= '' then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if newest == nil or newest[1] ~= ARGV[3] then
    return false
  end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[1])
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if KEYS[3] then
  redis.call('SADD', KEYS[3], ARGV[4])
end
return id
"""

PUBLISH_OUTCOME = """
-- Store one incarnation's outcome of a revision, keep the newest outcome of the revision under its bare number,
-- keep at most ARGV[6] incarnations (the newest) per revision and the outcomes of the newest ARGV[5] revisions.
-- Then append the revision's newest outcome to the outcome stream, which waiting weavers read (XREAD BLOCK),
-- unless the call names no stream (a user whose ACL predates it).
-- KEYS: [1] outcomes hash, [2] index (sorted set of revision numbers with outcomes), [3] outcome stream (optional)
-- ARGV: [1] revision, [2] incarnation, [3] payload, [4] at (a decimal string), [5] revisions kept,
--       [6] incarnations kept per revision, [7] entries kept in the outcome stream
local hash, index, rev, inc = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local listed = rev .. '#'
local kept = {}
local raw = redis.call('HGET', hash, listed)
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then kept = decoded end
else
  -- A version-1 outcome under the bare number: keep it as the record of its (empty) incarnation.
  local legacy = redis.call('HGET', hash, rev)
  if legacy then
    local ok, decoded = pcall(cjson.decode, legacy)
    if ok and type(decoded) == 'table' and (decoded.incarnation == nil or decoded.incarnation == '') then
      local at = '0'
      if type(decoded.at) == 'number' then at = string.format('%.17g', decoded.at) end
      redis.call('HSET', hash, rev .. ':', legacy)
      table.insert(kept, {at, ''})
    end
  end
end
local others = {}
for _, item in ipairs(kept) do
  if item[2] ~= inc then table.insert(others, item) end
end
table.insert(others, {ARGV[4], inc})
table.sort(others, function(a, b) return tonumber(a[1]) < tonumber(b[1]) end)
redis.call('HSET', hash, rev .. ':' .. inc, ARGV[3])
while #others > tonumber(ARGV[6]) do
  local dropped = table.remove(others, 1)
  redis.call('HDEL', hash, rev .. ':' .. dropped[2])
end
redis.call('HSET', hash, listed, cjson.encode(others))
local newest = redis.call('HGET', hash, rev .. ':' .. others[#others][2])
redis.call('HSET', hash, rev, newest)
if KEYS[3] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'revision', rev, 'data', newest)
end
redis.call('ZADD', index, rev, rev)
local excess = redis.call('ZCARD', index) - tonumber(ARGV[5])
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', index, 0, excess - 1)) do
    local old_list = redis.call('HGET', hash, old .. '#')
    if old_list then
      local ok, decoded = pcall(cjson.decode, old_list)
      if ok and type(decoded) == 'table' then
        for _, item in ipairs(decoded) do redis.call('HDEL', hash, old .. ':' .. item[2]) end
      end
    end
    redis.call('HDEL', hash, old, old .. '#', old .. ':')
    redis.call('ZREM', index, old)
  end
end
return 1
"""

__all__ = ["NEWEST_REVISIONS", "NUMBER_SCAN", "PUBLISH_OUTCOME", "PUBLISH_STATUS", "PUT_REVISION", "STATUSES"]
