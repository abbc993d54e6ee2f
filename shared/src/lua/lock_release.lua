-- Delete a lock only if it is ours.
-- KEYS[1] lock; ARGV[1] our holder value. Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
