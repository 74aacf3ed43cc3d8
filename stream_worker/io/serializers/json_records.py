"""JSON: one compact object per record (a Kafka message, or a file of a JSON array), and JSON
lines (one object per line). No NaN or infinity ever appears: a missing number is ``null``."""

from __future__ import annotations

import json
from typing import BinaryIO

from stream_worker.core.records import RESULT_SCHEMA_VERSION
from stream_worker.io.serializers import Serializer

RESULT_CONTENT_TYPE = f"application/vnd.apogee.result+json; version={RESULT_SCHEMA_VERSION}"


def encode(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def decode(value: bytes) -> dict:
    """The record in a message value; NaN and infinity are refused as ``encode`` never writes them."""
    record = json.loads(value, parse_constant=_refuse_constant)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    return record


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid in a result record (a missing number is null)")


def write_array(records: list[dict], stream: BinaryIO) -> None:
    stream.write(b"[" + b",\n".join(encode(record) for record in records) + b"]\n")


def write_lines(records: list[dict], stream: BinaryIO) -> None:
    for record in records:
        stream.write(encode(record) + b"\n")


SERIALIZERS = {
    "json": Serializer("json", (".json",), write_array, encode, RESULT_CONTENT_TYPE, decode),
    "jsonl": Serializer("jsonl", (".jsonl",), write_lines, encode, RESULT_CONTENT_TYPE, decode),
}
