-- Record the outcome of our claim.
-- KEYS[1] state; ARGV[1] worker id, ARGV[2] new state ('done', 'dead' or '' to release),
-- ARGV[3] ttl ms for done/dead.
-- Returns 1 if the claim was ours, 0 if it was not (it expired and someone else took it).
local cur = redis.call('GET', KEYS[1])
local mine = cur == 'running:' .. ARGV[1]
if ARGV[2] == '' then
  if mine then redis.call('DEL', KEYS[1]) return 1 end
  return 0
end
-- The outcome is recorded even if our claim lapsed: the work did finish.
if cur == 'done' or cur == 'dead' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return mine and 1 or 0
