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


def write_array(records: list[dict], stream: BinaryIO) -> None:
    stream.write(b"[" + b",\n".join(encode(record) for record in records) + b"]\n")


def write_lines(records: list[dict], stream: BinaryIO) -> None:
    for record in records:
        stream.write(encode(record) + b"\n")


SERIALIZERS = {
    "json": Serializer("json", (".json",), write_array, encode, RESULT_CONTENT_TYPE),
    "jsonl": Serializer("jsonl", (".jsonl",), write_lines, encode, RESULT_CONTENT_TYPE),
}
