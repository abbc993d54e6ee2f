-- Delete the lease only if it is ours, and tell standbys at once.
-- KEYS[1] lease; ARGV[1] our full lease value, ARGV[2] channel. Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[1])
  return 1
end
return 0
