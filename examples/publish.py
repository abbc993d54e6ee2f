#!/usr/bin/env python3
"""Publish one ad-hoc task to cronpipe from Python (pika).

Builds an envelope by the rules of docs/envelope.schema.json and publishes it
to the work queue through RabbitMQ's default exchange (routing key = queue
name), persistent, mandatory, with publisher confirms: the script exits 0 only
once the broker has confirmed the message, and prints the envelope id.

    pip install 'pika==1.3.2'
    python3 examples/publish.py --url amqp://guest:guest@127.0.0.1:5672/%2f \\
        --queue cronpipe.tasks --task report --payload '{"a":1}' [--key K]

The queue is not declared here: cronpipe declares it (a quorum queue by
default), and declaring it again with other arguments would fail. A passive
declare checks it exists, so a typo in --queue is an error rather than a
message the broker drops.

Exit status: 0 published and confirmed, 2 bad arguments, 1 anything else
(broker unreachable, queue missing, message returned or nacked).
"""

import argparse
import json
import sys

from cronpipe_envelope import add_task_arguments, build_envelope, parse_task_arguments

try:
    import pika
    import pika.exceptions
except ImportError:  # pragma: no cover - depends on the environment
    sys.stderr.write(
        "error: the pika package is not installed; install it with: "
        "python3 -m pip install 'pika==1.3.2'\n"
    )
    sys.exit(1)

def publish(url, queue, envelope, timeout=10.0):
    """Publishes `envelope` to `queue` and waits for the broker's confirm.

    Raises on any failure: connection, missing queue, the broker returning the
    message as unroutable (mandatory) or nacking it.
    """
    params = pika.URLParameters(url)
    params.socket_timeout = timeout
    params.blocked_connection_timeout = timeout
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        # Fails with 404 NOT_FOUND (closing the channel) when the queue does
        # not exist; never changes an existing queue.
        channel.queue_declare(queue=queue, passive=True)
        channel.confirm_delivery()
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        # With confirms on, basic_publish blocks until the broker acks, and
        # raises UnroutableError (mandatory, no queue took it) or NackError.
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=envelope["id"],
            ),
            mandatory=True,
        )
    finally:
        if connection.is_open:
            connection.close()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Publish one cronpipe task (envelope v1) to RabbitMQ with publisher confirms; prints its id.",
        epilog="example: %(prog)s --url amqp://guest:guest@127.0.0.1:5672/%%2f "
        "--queue cronpipe.tasks --task report --payload '{\"a\":1}' --key report-2026-11-21",
    )
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f",
                        help="AMQP URL (default: %(default)s)")
    parser.add_argument("--queue", default="cronpipe.tasks",
                        help="work queue, cronpipe's broker.rabbitmq.queue (default: %(default)s)")
    add_task_arguments(parser)
    return parse_task_arguments(parser, argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    envelope = build_envelope(args.task, args.payload, args.key)
    try:
        publish(args.url, args.queue, envelope, timeout=args.timeout)
    except pika.exceptions.UnroutableError:
        print(f"error: queue `{args.queue}` did not take the message (returned as unroutable)", file=sys.stderr)
        return 1
    except pika.exceptions.NackError:
        print("error: the broker refused the message (nack)", file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as e:
        print(f"error: the broker closed the channel: {e.reply_code} {e.reply_text}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as e:
        print(f"error: RabbitMQ at {args.url.split('@')[-1]}: {e!r}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(envelope["id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
