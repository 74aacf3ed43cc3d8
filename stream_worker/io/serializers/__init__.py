"""Output formats by name: one registry shared by ``stream-worker run`` (each record one Kafka
message) and ``stream-worker infer`` (all records one file).

A format is one module here whose ``SERIALIZERS`` maps its name to a :class:`Serializer`, plus
its line in :data:`FORMATS`. Serializers take finished records (:func:`stream_worker.core.records.build_record`)
and never decide fields.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

if TYPE_CHECKING:
    from stream_worker.io.schema_registry import SchemaRegistry

FORMATS = {
    "json": "stream_worker.io.serializers.json_records",
    "jsonl": "stream_worker.io.serializers.json_records",
    "csv": "stream_worker.io.serializers.csv_table",
    "fits": "stream_worker.io.serializers.fits_table",
    "avro": "stream_worker.io.serializers.avro_records",
}
"""Format name -> the module that implements it (imported on first use: FITS needs astropy)."""


@dataclass(frozen=True)
class Serializer:
    """``write`` puts a list of records into a binary file; ``encode`` turns one record into a
    message value (``None`` for formats that only make files), sent with ``content_type``;
    ``decode`` turns such a value back into the record (the results sink reads with it) or raises
    ValueError. A format whose messages name a schema in a registry has ``bind`` instead:
    ``bind(registry, subject, compatibility)`` registers the schema and returns the serializer
    that encodes and decodes (:func:`message_serializer`)."""

    name: str
    suffixes: tuple[str, ...]
    write: Callable[[list[dict], BinaryIO], None]
    encode: Callable[[dict], bytes] | None = None
    content_type: str | None = None
    decode: Callable[[bytes], dict] | None = None
    bind: Callable[[SchemaRegistry, str, str | None], Serializer] | None = None

    @property
    def for_messages(self) -> bool:
        return self.encode is not None or self.bind is not None


def serializer(name: str) -> Serializer:
    """The serializer called ``name``, or a ValueError that lists the known ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown output format {name!r}: choose one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name]).SERIALIZERS[name]


def message_formats() -> list[str]:
    """Formats that can encode one record as one message (for ``kafka.result_format``)."""
    return [name for name in FORMATS if serializer(name).for_messages]


def message_serializer(name: str, topic: str, registry_url: str | None = None, compatibility: str | None = None,
                       wait_s: float = 60.0) -> Serializer:
    """The serializer of one record per message on ``topic``. A format that needs a registry is
    bound to the schema registered under ``<topic>-value`` (Confluent's TopicNameStrategy, what
    every registry-aware consumer looks up), waiting up to ``wait_s`` for the registry to answer:
    in a cluster the worker may start first."""
    chosen = serializer(name)
    if not chosen.for_messages:
        raise ValueError(f"output format {name!r} cannot encode one record per message")
    if chosen.bind is None:
        return chosen
    if not registry_url:
        raise ValueError(f"output format {name!r} needs a schema registry: set kafka.schema_registry_url")
    from stream_worker.io.schema_registry import SchemaRegistry

    registry = SchemaRegistry(registry_url)
    registry.wait_until_reachable(wait_s)
    return chosen.bind(registry, f"{topic}-value", compatibility)


def for_path(path: Path) -> Serializer:
    """The serializer whose suffix ``path`` has."""
    suffix = path.suffix.lower()
    for name in FORMATS:
        chosen = serializer(name)
        if suffix in chosen.suffixes:
            return chosen
    known = sorted({s for name in FORMATS for s in serializer(name).suffixes})
    raise ValueError(f"{path}: unknown output format {suffix!r}; use one of {', '.join(known)}")


def write_records(records: list[dict], path: str | Path | None, format: str | None = None) -> None:
    """Writes one row per record to ``path`` (``None`` or ``-``: stdout), in ``format`` or, by
    default, the format its suffix names (stdout: JSON lines)."""
    to_stdout = path in (None, "-")
    chosen = serializer(format) if format else serializer("jsonl") if to_stdout else for_path(Path(path))
    if to_stdout:
        chosen.write(records, sys.stdout.buffer)
        sys.stdout.flush()
        return
    with Path(path).open("wb") as stream:
        chosen.write(records, stream)
