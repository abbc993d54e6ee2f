-- Advance schedule watermarks, only while the caller holds the lease.
-- KEYS[1] lease, KEYS[2] watermarks hash; ARGV[1] our full lease value,
-- then pairs of (schedule, slot ms). A watermark never moves backwards.
-- Returns 1, or 0 when the lease is not ours (nothing is written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  -- A value that is not a number (written by hand) is replaced.
  local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '') or -1
  if tonumber(ARGV[i + 1]) > cur then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 1
