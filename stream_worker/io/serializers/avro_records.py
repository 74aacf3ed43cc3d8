"""Avro: each record one message in the Confluent wire format (byte 0, the writer schema's
4-byte registry id, the Avro binary body), or all records one Avro container file.

The Avro schema is derived from ``result.v2.json`` (:func:`avro_schema`), so JSON and Avro
records are one contract: a field whose JSON type admits null is ``["null", T]`` with default
null, ``integer`` is ``long``, ``number`` is ``double``, and enumerations are strings (a new
value must not break old readers). How the schema may evolve: ``docs/messages.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import struct
from typing import BinaryIO

import fastavro

from stream_worker.core.records import RESULT_SCHEMA_VERSION, result_json_schema
from stream_worker.io.schema_registry import RegistryRefused, SchemaRegistry
from stream_worker.io.serializers import Serializer
from stream_worker.io.serializers.csv_table import columns

RESULT_CONTENT_TYPE = f"application/vnd.apogee.result+avro; version={RESULT_SCHEMA_VERSION}"
AVRO_NAMESPACE = "org.sdss.apogee.stream_worker"
WIRE_MAGIC = 0
_WIRE_PREFIX = struct.Struct(">bI")
log = logging.getLogger(__name__)
_AVRO_TYPES = {"integer": "long", "number": "double", "string": "string", "boolean": "boolean"}


def avro_schema(fields: tuple[str, ...] | None = None) -> dict:
    """The result record as an Avro schema: every ``result.v2.json`` property in the order of its
    ``required`` list (or only ``fields``, in their order: a file of ``stream-worker infer``
    records has no input position)."""
    json_schema = result_json_schema()
    properties = json_schema["properties"]
    names = fields if fields is not None else tuple(json_schema["required"])
    unknown = [name for name in names if name not in properties]
    if unknown:
        raise ValueError(f"not fields of the result record: {', '.join(unknown)}")
    return {
        "type": "record", "name": "Result", "namespace": AVRO_NAMESPACE,
        "doc": json_schema["title"],
        "fields": [_avro_field(name, properties[name], json_schema.get("$defs", {})) for name in names],
    }


def _avro_field(name: str, spec: dict, definitions: dict) -> dict:
    if "$ref" in spec:
        spec = {**definitions[spec["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in spec.items() if k != "$ref"}}
    if "enum" in spec:
        json_types = ["null", "string"] if None in spec["enum"] else ["string"]
    else:
        json_types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    types = [_AVRO_TYPES[t] for t in json_types if t != "null"]
    if len(types) != 1:
        raise ValueError(f"result field {name}: JSON types {json_types} have no single Avro type")
    field = {"name": name, "doc": spec.get("description", "")}
    if "null" in json_types:
        return {**field, "type": ["null", types[0]], "default": None}
    return {**field, "type": types[0]}


@functools.lru_cache(maxsize=None)
def _parsed(fields: tuple[str, ...] | None = None):
    return fastavro.parse_schema(avro_schema(fields))


def write(records: list[dict], stream: BinaryIO) -> None:
    """An Avro container file: its schema travels in its header, no registry needed to read it."""
    fields = tuple(columns(records)) if records else None
    fastavro.writer(stream, _parsed(fields), records, codec="deflate")


def bind(registry: SchemaRegistry, subject: str, compatibility: str | None) -> Serializer:
    """The message serializer for ``subject``: sets the subject's compatibility level (unless
    ``None``: the registry's own rule stands), registers the schema (the registry refuses, and so
    does start-up, a schema its rule forbids) and encodes with the id it got; decodes messages
    of any schema id the registry knows."""
    if compatibility:
        registry.set_compatibility(subject, compatibility)
    schema_id = registry.register(subject, json.dumps(avro_schema()))
    prefix = _WIRE_PREFIX.pack(WIRE_MAGIC, schema_id)
    writer_schema = _parsed()

    def encode(record: dict) -> bytes:
        out = io.BytesIO()
        out.write(prefix)
        fastavro.schemaless_writer(out, writer_schema, record)
        return out.getvalue()

    log.info("result schema registered under %s as id %d", subject, schema_id)
    return dataclasses.replace(SERIALIZERS["avro"], encode=encode, decode=functools.partial(decode_message, registry),
                               bind=None)


def decode_message(registry: SchemaRegistry, value: bytes) -> dict:
    """The record in a message value, read with the writer schema its id names. ValueError for a
    value that is not one (wrong magic byte, an id the registry does not know, a body the schema
    cannot read); RegistryUnavailable, not a ValueError, means the message may be fine: retry."""
    if len(value) < _WIRE_PREFIX.size or value[0] != WIRE_MAGIC:
        raise ValueError(f"not in the Confluent Avro wire format (byte 0 {value[:1].hex() or 'missing'}, expected 00)")
    _, schema_id = _WIRE_PREFIX.unpack_from(value)
    try:
        writer_schema = _parsed_text(registry.schema(schema_id))
    except RegistryRefused as exc:
        raise ValueError(f"schema id {schema_id}: {exc}") from None
    body = io.BytesIO(value[_WIRE_PREFIX.size:])
    try:
        record = fastavro.schemaless_reader(body, writer_schema, None)
    except (EOFError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"Avro body does not match schema id {schema_id}: {type(exc).__name__}: {exc}") from None
    if body.tell() != len(value) - _WIRE_PREFIX.size:
        raise ValueError(f"Avro body longer than a record of schema id {schema_id}")
    if not isinstance(record, dict):
        raise ValueError(f"schema id {schema_id} is not a record schema")
    return record


@functools.lru_cache(maxsize=64)
def _parsed_text(text: str):
    return fastavro.parse_schema(json.loads(text))


SERIALIZERS = {"avro": Serializer("avro", (".avro",), write, content_type=RESULT_CONTENT_TYPE, bind=bind)}
