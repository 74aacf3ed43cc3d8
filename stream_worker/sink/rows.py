"""A results-topic message → its checked record → a database row. Pure: no database, no Kafka.

A record is stored only if it is what the worker publishes: the ``result.v2.json`` schema, its
key equal to its ``spectrum_id``, timestamps that are real instants. Anything else is a
:class:`RejectedRecord` with a reason code, for the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import fastjsonschema

from stream_worker.core.records import RESULT_SCHEMA_VERSION, result_json_schema

RESULT_SCHEMA = result_json_schema()
RECORD_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA["properties"])
"""One column per record field, named as the field."""
SOURCE_COLUMNS = ("result_topic", "result_partition", "result_offset")
"""Where in the results topic the stored record was read (the last one stored for the spectrum)."""
TIMESTAMP_FIELDS = ("processed_at", "published_at")


class RejectedRecord(ValueError):
    """A message the sink will not store; ``reason`` is the dead letter's ``dlq.reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Row:
    """One record as the values of ``RECORD_COLUMNS + SOURCE_COLUMNS``."""

    spectrum_id: str
    values: tuple


class RowReader:
    """Checks each consumed message and makes its row; the schema is compiled once."""

    def __init__(self, decode: Callable[[bytes], dict]) -> None:
        """``decode``: the result format's (:attr:`~stream_worker.io.serializers.Serializer.decode`)."""
        self.decode = decode
        self.validate = fastjsonschema.compile(RESULT_SCHEMA)  # ~60 us a record, jsonschema's ~1.2 ms

    def row(self, message) -> Row:
        """The row of a consumed message (``topic``, ``partition``, ``offset``, ``key``, ``value``)."""
        record = self.record(message)
        values = [record[name] for name in RECORD_COLUMNS]
        for name in TIMESTAMP_FIELDS:
            values[RECORD_COLUMNS.index(name)] = _instant(record[name], name)
        return Row(record["spectrum_id"], (*values, message.topic, message.partition, message.offset))

    def record(self, message) -> dict:
        if message.value is None:
            raise RejectedRecord("decode_error", "no value (a tombstone): the sink never deletes results")
        try:
            record = self.decode(message.value)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise RejectedRecord("decode_error", f"not a result record: {exc}") from None
        version = record.get("schema_version")
        if version != RESULT_SCHEMA_VERSION:
            raise RejectedRecord("schema_version", f"result schema_version {version!r}: this sink stores "
                                                   f"version {RESULT_SCHEMA_VERSION}")
        try:
            self.validate(record)
        except fastjsonschema.JsonSchemaException as exc:  # "data.teff must be ...": names the field
            raise RejectedRecord("schema_mismatch", f"not a valid result record: {exc.message}"[:1000]) from None
        key = message.key.decode("utf-8", "replace") if message.key is not None else None
        if key != record["spectrum_id"]:
            raise RejectedRecord("key_mismatch", f"message key {key!r} is not the record's spectrum_id "
                                                 f"{record['spectrum_id']!r}")
        return record


def _instant(text: str, name: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise RejectedRecord("schema_mismatch", f"{name}: {text!r} is not a date and time: {exc}") from None
