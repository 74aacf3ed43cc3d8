"""Instants as operators type them on the command line, and as the dead-letter headers write them."""

from __future__ import annotations

import datetime as dt
import re

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An instant from ISO 8601 (``2026-12-01T10:00Z``, UTC if no zone) or an age (``90m``, ``6h``,
    ``2d``: that long before ``now``)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now - dt.timedelta(seconds=float(relative[1]) * _UNIT_SECONDS[relative[2]])
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: not an ISO 8601 time (2026-12-01T10:00Z) or an age (90m, 6h, 2d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def epoch_ms(moment: dt.datetime | None) -> int | None:
    """``moment`` as Kafka's timestamps count: milliseconds since the Unix epoch (None stays None)."""
    return None if moment is None else int(moment.timestamp() * 1000)


def header_time(moment: dt.datetime) -> str:
    """``moment`` in the ``dlq.failed_at`` format, so that the two compare as text."""
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
