"""Writing result records to files for offline users: FITS table, CSV or JSON lines."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import IO

import numpy as np
from astropy.table import Table

FORMATS = (".fits", ".csv", ".jsonl")


def _columns(records: list[dict]) -> list[str]:
    columns: list[str] = []
    for record in records:
        columns += [key for key in record if key not in columns]
    return columns


def write_jsonl(records: list[dict], stream: IO[str]) -> None:
    for record in records:
        stream.write(json.dumps(record, allow_nan=False) + "\n")


def write_records(records: list[dict], path: str | Path | None) -> None:
    """Writes one row per record; the format follows the suffix. ``None`` or ``-`` is stdout (JSON lines)."""
    if path in (None, "-"):
        write_jsonl(records, sys.stdout)
        return
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown output format {suffix!r}; use one of {', '.join(FORMATS)}")
    columns = _columns(records)
    if suffix == ".jsonl":
        with path.open("w") as stream:
            write_jsonl(records, stream)
    elif suffix == ".csv":
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows([{k: "" if r.get(k) is None else r[k] for k in columns} for r in records])
    else:
        Table({name: _fits_column([r.get(name) for r in records]) for name in columns}).write(path, overwrite=True)


def _fits_column(values: list):
    """FITS has no null: missing numbers become NaN (or -1 for integers), missing text ''."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return np.array([bool(v) for v in values])
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([math.nan if v is None else float(v) for v in values])
    return np.array(["" if v is None else str(v) for v in values])
