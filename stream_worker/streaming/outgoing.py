"""What a consumer of this project publishes: result messages and dead letters. Shared by the
worker and the results sink; no engine here (the sink runs without torch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stream_worker.io.wire import dead_letter_headers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: a result or a dead letter."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def dead_letter_message(message, reason: str, text: str, topic: str, max_bytes: int) -> Outgoing:
    """The dead letter of a consumed ``message`` (logged with its reason code): its key, value and
    headers plus the ``dlq.*`` headers, for ``topic``. A value over ``max_bytes`` would not fit the
    producer's limit: the evidence is kept, not the bytes."""
    log.warning("dead-lettering %s: [%s] %s", where(message), reason, text,
                extra={"reason": reason, "topic": message.topic, "partition": message.partition,
                       "offset": message.offset})
    headers = dead_letter_headers(message.headers, reason, text, message.topic, message.partition, message.offset)
    value = message.value or b""
    if len(value) > max_bytes:
        headers.append(("dlq.original_size", str(len(value)).encode()))
        value = b""
    return Outgoing(topic, message.key, value, headers)


def send(producer, messages: list[Outgoing]) -> list:
    """Hands ``messages`` to the producer; returns their futures, in order."""
    return [producer.send(m.topic, key=m.key, value=m.value, headers=m.headers) for m in messages]


def where(message) -> str:
    """``topic[partition]@offset`` of a consumed message, for logs."""
    return f"{message.topic}[{message.partition}]@{message.offset}"
