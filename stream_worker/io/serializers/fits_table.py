"""FITS: a binary table, one row per record. FITS has no null: a missing number becomes NaN (or
-1 for integers), missing text ''."""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np
from astropy.table import Table

from stream_worker.io.serializers import Serializer
from stream_worker.io.serializers.csv_table import columns


def _column(values: list):
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return np.array([bool(v) for v in values])
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([math.nan if v is None else float(v) for v in values])
    return np.array(["" if v is None else str(v) for v in values])


def write(records: list[dict], stream: BinaryIO) -> None:
    Table({name: _column([r.get(name) for r in records]) for name in columns(records)}).write(stream, format="fits")


SERIALIZERS = {"fits": Serializer("fits", (".fits",), write)}
