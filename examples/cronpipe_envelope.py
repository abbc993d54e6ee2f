"""Build cronpipe task envelopes (v1) by the rules of docs/envelope.schema.json.

Shared by the example publishers (publish.py for RabbitMQ, publish_kafka.py
for Kafka); it needs no broker library.
"""

import datetime
import uuid

# Limits from docs/envelope.schema.json ($defs/name): what the worker is sure
# to accept is an ASCII string of 1 to 256 characters, or any string of 1 to 64
# characters.
NAME_MAX_ASCII = 256
NAME_MAX_ANY = 64


def check_name(field, value):
    """Raises ValueError unless `value` satisfies the schema's $defs/name."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: expected a non-empty string")
    limit = NAME_MAX_ASCII if value.isascii() else NAME_MAX_ANY
    if len(value) > limit:
        raise ValueError(
            f"{field}: {len(value)} characters; expected at most {NAME_MAX_ASCII} "
            f"ASCII characters or {NAME_MAX_ANY} characters otherwise"
        )
    return value


def rfc3339_utc_now():
    """Now in UTC as RFC 3339 with milliseconds and a Z suffix, like cronpipe writes."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def build_envelope(task, payload, idempotency_key=None):
    """An envelope v1 (docs/envelope.schema.json) for an ad-hoc task.

    Only the required fields and the ones given are written: optional fields
    are omitted rather than null (a JSON null payload reaches the handler as
    null either way), `attempt` is left to its default 1, and
    `schedule`/`slot`/`fencing_token` belong to scheduled fires only.
    """
    envelope = {
        "v": 1,  # a JSON integer, never 1.0 or "1"
        "id": str(uuid.uuid4()),  # lowercase hyphenated UUIDv4, as cronpipe itself uses
        "task": check_name("task", task),
        "created_at": rfc3339_utc_now(),
    }
    if payload is not None:
        envelope["payload"] = payload
    if idempotency_key is not None:
        envelope["idempotency_key"] = check_name("idempotency_key", idempotency_key)
    return envelope


def add_task_arguments(parser):
    """Adds --task, --payload, --key and --timeout, shared by the example publishers."""
    parser.add_argument("--task", required=True, help="task name; a worker needs a [task.NAME] handler for it")
    parser.add_argument("--payload", default=None,
                        help="payload as JSON text, handed to the task unchanged (default: none, the task gets null)")
    parser.add_argument("--key", default=None,
                        help="idempotency key: messages with the same key run once (default: the id)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the broker (default: %(default)s)")


def parse_task_arguments(parser, argv):
    """Parses `argv` and checks the task arguments by the schema's rules (exit 2 on bad input)."""
    import json

    args = parser.parse_args(argv)
    if args.payload is not None:
        try:
            args.payload = json.loads(args.payload)
        except json.JSONDecodeError as e:
            parser.error(f"--payload is not valid JSON: {e}")
    try:
        check_name("--task", args.task)
        if args.key is not None:
            check_name("--key", args.key)
    except ValueError as e:
        parser.error(str(e))
    return args
