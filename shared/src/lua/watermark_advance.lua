-- Advance schedule watermarks, only while the caller holds the lease.
-- KEYS[1] lease, KEYS[2] watermarks hash, KEYS[3] timings hash; ARGV[1] our
-- full lease value, then triples of (schedule, slot ms, timing). A watermark
-- never moves backwards; a non-empty timing is recorded with it (the
-- schedule's expression the watermark belongs to).
-- Returns 1, or 0 when the lease is not ours (nothing is written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 3 do
  -- A value that is not a number (written by hand) is replaced.
  local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '') or -1
  if tonumber(ARGV[i + 1]) > cur then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
  end
end
return 1
