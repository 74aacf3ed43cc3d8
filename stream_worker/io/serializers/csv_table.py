"""CSV: one row per record, a header of every field; a missing value is an empty cell."""

from __future__ import annotations

import csv
import io
from typing import BinaryIO

from stream_worker.io.serializers import Serializer


def columns(records: list[dict]) -> list[str]:
    """Every field of any record, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return list(names)


def write(records: list[dict], stream: BinaryIO) -> None:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    names = columns(records)
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    writer.writerows([{k: "" if r.get(k) is None else r[k] for k in names} for r in records])
    text.flush()
    text.detach()


SERIALIZERS = {"csv": Serializer("csv", (".csv",), write)}
