"""Inputs shared by the tests and the benchmarks: the real DR17 apStar files in ``tests/data``
(provenance: ``tests/data/README.md``) and consumed Kafka messages built without a broker."""

from __future__ import annotations

from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
GIANT_FILE = DATA / "apStar-dr17-2M17335483-2753043.fits"
DWARF_FILE = DATA / "apStar-dr17-2M19485057+5005279.fits"


def consumed(value, key=b"key", offset=0, headers=None, topic="apogee.spectra", partition=0,
             timestamp=1_764_000_000_000):
    """A message as kafka-python's consumer hands it over."""
    return ConsumerRecord(
        topic, partition, -1, offset, timestamp, 0, key, value, list(headers or []), None,
        -1 if key is None else len(key), -1 if value is None else len(value), -1,
    )
