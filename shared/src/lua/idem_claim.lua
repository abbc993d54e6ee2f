-- Claim a task key for one attempt.
-- KEYS[1] state, KEYS[2] attempts counter; ARGV[1] worker id, ARGV[2] claim ttl ms,
-- ARGV[3] attempts counter ttl ms.
-- Returns {'claimed', attempt} | {'done', 0} | {'dead', 0} | {'busy', owner, pttl}.
local cur = redis.call('GET', KEYS[1])
if cur == 'done' or cur == 'dead' then
  return {cur, 0}
end
if cur then
  return {'busy', cur, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], 'running:' .. ARGV[1], 'PX', ARGV[2])
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {'claimed', n}
