-- Take the leader lease if it is free, handing out the next fencing token.
-- KEYS[1] lease, KEYS[2] fencing counter; ARGV[1] instance:nonce, ARGV[2] ttl ms.
-- Returns {token, ttl} when taken, or {0, pttl of the current holder}.
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  return {0, pttl}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return {token, tonumber(ARGV[2])}
