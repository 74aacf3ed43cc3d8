"""Result records as the worker publishes them, made without the engine (tests of the sink)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

WEIGHTS_A = "a" * 64
WEIGHTS_B = "b" * 64


def result_record(spectrum_id: str, processed_at: str = "2026-12-01T10:00:00.000Z", weights: str = WEIGHTS_A,
                  **fields) -> dict:
    """A valid result.v2 record of ``spectrum_id``; ``fields`` override any field."""
    record = {
        "schema_version": 2, "spectrum_id": spectrum_id, "source_id": f"2M{abs(hash(spectrum_id)) % 10**8:08d}",
        "spectrum_kind": "visit", "visit": 1, "telescope": "apo25m", "mjd": 60000.5, "origin": "inline",
        "teff": 4800.0, "e_teff": 35.0, "logg": 2.5, "e_logg": 0.05, "fe_h": -0.2, "e_fe_h": 0.03,
        "raw_e_teff": 20.0, "raw_e_logg": 0.03, "raw_e_fe_h": 0.02, "result_flags": 0,
        "flag_warn": False, "flag_bad": False, "error_message": None, "model_name": "test-model",
        "model_trained": True, "weights_sha256": weights, "engine_plan": "exact/cpu/test",
        "worker_version": "0.1.0", "inference_seconds": 0.01, "processed_at": processed_at,
        "input_topic": "apogee.spectra", "input_partition": 0, "input_offset": 7,
        "input_timestamp_ms": 1764583200000, "published_at": processed_at,
    }
    record.update(fields)
    return record


def later(timestamp: str, seconds: float) -> str:
    moment = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")) + dt.timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encoded(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


@dataclass
class Message:
    """A consumed message, shaped like kafka-python's ConsumerRecord."""

    value: bytes | None
    key: bytes | None = None
    topic: str = "apogee.results"
    partition: int = 0
    offset: int = 0
    headers: list = field(default_factory=list)
    timestamp: int = 1764583200000


def message_of(record: dict, offset: int = 0, partition: int = 0) -> Message:
    return Message(encoded(record), record["spectrum_id"].encode(), partition=partition, offset=offset)
