-- Forget the watermarks of removed schedules, only while the caller holds the lease.
-- KEYS[1] lease, KEYS[2] watermarks hash, KEYS[3] timings hash; ARGV[1] our
-- full lease value, then the schedule names. Returns 1, or 0 when the lease
-- is not ours (nothing is removed).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
return 1
