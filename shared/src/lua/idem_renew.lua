-- Extend a running claim if it is still ours. KEYS[1] state; ARGV[1] worker id, ARGV[2] ttl ms.
if redis.call('GET', KEYS[1]) == 'running:' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
