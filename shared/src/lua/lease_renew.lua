-- Extend a lease or lock only if it is still ours (never a bare PEXPIRE).
-- KEYS[1] lease or lock; ARGV[1] our value, ARGV[2] ttl ms. Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
