"""Result records: the one place that decides which fields a user receives, and in what order.

Every record — published by the stream, written by ``stream-worker infer``, in any output format
— is built by :func:`build_record` from a spectrum's identity, the engine's
:class:`~stream_worker.core.estimate.Estimate`, the engine's :class:`Provenance` and, for the
stream, where the input came from (:class:`KafkaSource`). Pure: a flat JSON-ready dict out.
The field list is the contract of ``schemas/result.v2.json`` (``docs/messages.md``).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from importlib import resources

from stream_worker import __version__
from stream_worker.core.estimate import Estimate
from stream_worker.core.spectrum import Spectrum

RESULT_SCHEMA_VERSION = 2
"""Version of the result record; v2 added ``engine_plan`` (``docs/messages.md``, versioning)."""


@functools.lru_cache(maxsize=None)
def result_json_schema() -> dict:
    """The packaged JSON Schema of the current record version (the Avro schema derives from it)."""
    return json.loads((resources.files("stream_worker") / "schemas" / f"result.v{RESULT_SCHEMA_VERSION}.json").read_text())


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Provenance:
    """What produced a record: the weights, the precision plan in force, the worker's version."""

    model_name: str
    model_trained: bool
    weights_sha256: str
    engine_plan: str
    worker_version: str = __version__


@dataclass(frozen=True)
class KafkaSource:
    """Where a streamed input came from."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None

    @classmethod
    def of(cls, message) -> KafkaSource:
        """From a consumed message (kafka-python's ``ConsumerRecord`` or anything shaped like it)."""
        return cls(message.topic, message.partition, message.offset, message.timestamp)


def build_record(spectrum: Spectrum, estimate: Estimate, provenance: Provenance,
                 source: KafkaSource | None = None) -> dict:
    """One spectrum's record: identity, science, provenance, timing and, for streamed inputs,
    the input's position and the time the record was built for publishing."""
    record = {
        "schema_version": RESULT_SCHEMA_VERSION,
        **spectrum.metadata(),
        **estimate.science(),
        "error_message": estimate.error_message,
        "model_name": provenance.model_name,
        "model_trained": provenance.model_trained,
        "weights_sha256": provenance.weights_sha256,
        "engine_plan": provenance.engine_plan,
        "worker_version": provenance.worker_version,
        "inference_seconds": estimate.inference_seconds,
        "processed_at": utc_now(),
    }
    if source is not None:
        record.update(
            input_topic=source.topic,
            input_partition=source.partition,
            input_offset=source.offset,
            input_timestamp_ms=source.timestamp_ms,
            published_at=utc_now(),
        )
    return record
