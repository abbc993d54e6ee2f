#!/usr/bin/env python3
"""Publish one ad-hoc task to cronpipe on Kafka from Python (confluent-kafka).

Builds an envelope by the rules of docs/envelope.schema.json and produces it to
cronpipe's work topic with an idempotent producer (enable.idempotence, acks=all),
keyed by the idempotency key (or the id) as cronpipe's own producer does, so
duplicates of one task land on one partition. The script exits 0 only once the
broker's delivery report confirmed the message, and prints the envelope id.

    pip install 'confluent-kafka==2.16.1'
    python3 examples/publish_kafka.py --brokers 127.0.0.1:9092 \\
        --topic cronpipe.tasks --task report --payload '{"a":1}' [--key K]

Exit status: 0 delivered, 2 bad arguments, 1 anything else (broker
unreachable, topic missing, delivery failed).
"""

import argparse
import json
import sys

from cronpipe_envelope import add_task_arguments, build_envelope, parse_task_arguments

try:
    from confluent_kafka import Producer
except ImportError:  # pragma: no cover - depends on the environment
    sys.stderr.write(
        "error: the confluent-kafka package is not installed; install it with: "
        "python3 -m pip install 'confluent-kafka==2.16.1'\n"
    )
    sys.exit(1)


def publish(brokers, topic, envelope, timeout=10.0, extra=None):
    """Produces `envelope` to `topic` and waits for its delivery report; raises on failure."""
    config = {
        "bootstrap.servers": brokers,
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": int(timeout * 1000),
    }
    config.update(extra or {})
    producer = Producer(config)
    outcome = {}

    def on_delivery(err, msg):
        outcome["err"] = err
        outcome["partition"] = None if msg is None else msg.partition()

    body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    key = envelope.get("idempotency_key", envelope["id"]).encode("utf-8")
    producer.produce(
        topic,
        value=body,
        key=key,
        headers=[
            ("cronpipe-id", envelope["id"].encode("utf-8")),
            ("cronpipe-task", envelope["task"].encode("utf-8")),
            ("content-type", b"application/json"),
        ],
        on_delivery=on_delivery,
    )
    remaining = producer.flush(timeout)
    if remaining or "err" not in outcome:
        raise RuntimeError(f"no delivery report within {timeout}s (is the broker at {brokers} reachable?)")
    if outcome["err"] is not None:
        raise RuntimeError(f"delivery failed: {outcome['err']}")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Publish one cronpipe task (envelope v1) to Kafka with an idempotent producer; prints its id.",
        epilog="example: %(prog)s --brokers 127.0.0.1:9092 --topic cronpipe.tasks --task report --payload '{\"a\":1}'",
    )
    parser.add_argument("--brokers", default="127.0.0.1:9092", help="bootstrap servers (default: %(default)s)")
    parser.add_argument("--topic", default="cronpipe.tasks",
                        help="work topic, cronpipe's broker.kafka.topic (default: %(default)s)")
    add_task_arguments(parser)
    return parse_task_arguments(parser, argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    envelope = build_envelope(args.task, args.payload, args.key)
    try:
        publish(args.brokers, args.topic, envelope, timeout=args.timeout)
    except (RuntimeError, Exception) as e:  # confluent_kafka raises KafkaException and BufferError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(envelope["id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
