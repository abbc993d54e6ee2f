-- Take the leader lease if it is free, handing out the next fencing token.
-- KEYS[1] lease, KEYS[2] fencing counter; ARGV[1] instance:nonce, ARGV[2] ttl ms.
-- Returns the new token, or 0 when another producer holds the lease.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return token
