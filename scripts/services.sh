#!/usr/bin/env bash
# Starts Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) if they are not
# answering, and waits until both do. Sourced or run by scripts/test, scripts/demo and .ci/run.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! redis_up; then
  echo "services: starting Redis on 127.0.0.1:6379"
  command -v redis-server >/dev/null || { echo "services: redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "services: Redis did not start" >&2; exit 1; }
fi

if ! rabbit_up || ! rabbitmqctl -q status >/dev/null 2>&1; then
  if ! rabbit_up; then
    echo "services: starting RabbitMQ on 127.0.0.1:5672"
    command -v rabbitmq-server >/dev/null || { echo "services: rabbitmq-server is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
    rabbitmq-server -detached || true
  fi
  rabbitmqctl await_startup --timeout 120
  # An app stopped by an earlier run (rabbitmqctl stop_app) is started again.
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do rabbit_up && break; sleep 0.2; done
  rabbit_up || { echo "services: RabbitMQ did not open port 5672" >&2; exit 1; }
fi
echo "services: Redis and RabbitMQ are up"
