"""The Kafka wire format (input schema version 1): decoding and encoding input messages, and the headers of dead letters.

Input value, binary-safe and compact (docs/messages.md)::

    b"APSP" | uint32 little-endian header length | header (UTF-8 JSON) | payload

The header says what the message is (``"inline"`` or ``"reference"``) and identifies the
spectrum; an inline payload is the flux array followed by the ivar (or error) array, both
``n_pixels`` little-endian floats of ``dtype``. A reference names an apStar file and which
spectrum in it; it has no payload. Results are encoded by the serializers (``io.serializers``).

Pure functions: bytes in, :class:`~stream_worker.core.spectrum.Spectrum` (or an ``InputError`` with
a reason code) out.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_worker import __version__
from stream_worker.core.records import utc_now
from stream_worker.core.spectrum import InputError, Spectrum, ivar_from_error

MAGIC = b"APSP"
SCHEMA_VERSION = 1
"""Version of the input envelope (the result record has its own, ``core.records.RESULT_SCHEMA_VERSION``)."""
SUPPORTED_VERSIONS = (1,)
MAX_HEADER_BYTES = 65_536
DTYPES = ("<f4", "<f8")
CONTENT_TYPE = "application/vnd.apogee.spectrum+binary; version=1"
_PREFIX = struct.Struct("<4sI")

IDENTITY_FIELDS = ("spectrum_id", "source_id", "telescope", "spectrum_kind", "visit", "mjd")


@dataclass(frozen=True)
class FileReference:
    """An input that points at a spectrum in an apStar file on shared storage."""

    path: str
    which: str | int  # "coadd" or a 1-based visit number
    header: dict


def encode_inline(spectrum: Spectrum, uncertainty: str = "ivar", dtype: str = "<f4") -> bytes:
    """An inline input message: identifiers in the header, flux and ivar (or error) as raw floats."""
    if uncertainty not in ("ivar", "error"):
        raise ValueError(f"uncertainty must be 'ivar' or 'error', got {uncertainty!r}")
    flux = np.ascontiguousarray(spectrum.flux, dtype=dtype)
    second = spectrum.ivar if uncertainty == "ivar" else _error_from_ivar(spectrum.ivar)
    header = {
        "schema_version": SCHEMA_VERSION,
        "kind": "inline",
        **_identity(spectrum),
        "n_pixels": int(flux.shape[0]),
        "dtype": dtype,
        "uncertainty": uncertainty,
    }
    return _frame(header, flux.tobytes() + np.ascontiguousarray(second, dtype=dtype).tobytes())


def encode_reference(path: str, which: str | int = "coadd", spectrum_id: str | None = None, **identity) -> bytes:
    """A reference input message: the worker reads the spectrum from ``path`` itself."""
    label = "coadd" if which == "coadd" else f"visit{int(which)}"
    header = {
        "schema_version": SCHEMA_VERSION,
        "kind": "reference",
        "spectrum_id": spectrum_id or f"{Path(path).stem}:{label}",
        "path": str(path),
        "which": which,
        **identity,
    }
    return _frame(header, b"")


def _identity(spectrum: Spectrum) -> dict:
    meta = spectrum.metadata()
    return {name: meta[name] for name in IDENTITY_FIELDS}


def _error_from_ivar(ivar: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        error = 1.0 / np.sqrt(np.asarray(ivar, dtype=np.float64))
    return np.where(np.asarray(ivar) > 0, error, np.inf)


def _frame(header: dict, payload: bytes) -> bytes:
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + payload


def decode_header(value: bytes | None) -> tuple[dict, memoryview]:
    """Splits a message into its JSON header and its payload, checking the framing and version."""
    if value is None:
        raise InputError("decode_error", "message has no value (tombstone)")
    if len(value) < _PREFIX.size:
        raise InputError("decode_error", f"message of {len(value)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, header_length = _PREFIX.unpack_from(value)
    if magic != MAGIC:
        raise InputError("decode_error", f"message does not start with {MAGIC!r} (found {bytes(magic)!r})")
    if header_length > MAX_HEADER_BYTES or _PREFIX.size + header_length > len(value):
        raise InputError(
            "decode_error",
            f"header length {header_length} does not fit a {len(value)}-byte message (limit {MAX_HEADER_BYTES})",
        )
    raw_header = bytes(value[_PREFIX.size : _PREFIX.size + header_length])
    try:
        header = json.loads(raw_header.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise InputError("decode_error", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InputError("decode_error", f"header must be a JSON object, found {type(header).__name__}")
    version = header.get("schema_version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:  # JSON true is not version 1
        raise InputError(
            "schema_version", f"schema_version {version!r} is not supported (supported: {list(SUPPORTED_VERSIONS)})"
        )
    return header, memoryview(value)[_PREFIX.size + header_length :]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _field(header: dict, name: str, kinds: tuple, required: bool = False):
    """A header field of one of ``kinds``: strings must be valid Unicode (they become Kafka keys
    and UTF-8 headers), numbers finite (they become JSON)."""
    value = header.get(name)
    if value is None:
        if required:
            raise InputError("invalid_field", f"header field {name!r} is required")
        return None
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise InputError("invalid_field", f"header field {name!r} must be {expected}, found {value!r}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("invalid_field", f"header field {name!r} is not valid Unicode: {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError("invalid_field", f"header field {name!r} must be finite, found {value!r}")
    return value


def _identity_fields(header: dict) -> dict:
    """The optional identifying fields, type-checked, for inline and reference messages alike."""
    return {
        "source_id": _field(header, "source_id", (str,)),
        "telescope": _field(header, "telescope", (str,)),
        "mjd": _field(header, "mjd", (int, float)),
    }


def decode_input(value: bytes | None) -> Spectrum | FileReference:
    """An input message as a :class:`Spectrum` (inline) or :class:`FileReference`."""
    header, payload = decode_header(value)
    spectrum_id = _field(header, "spectrum_id", (str,), required=True)
    kind = header.get("kind")
    if kind == "reference":
        if len(payload):
            raise InputError("decode_error", f"a reference message has no payload, found {len(payload)} bytes")
        which = header.get("which", "coadd")
        if which != "coadd" and (not isinstance(which, int) or isinstance(which, bool) or which < 1):
            raise InputError("invalid_field", f"'which' must be \"coadd\" or a visit number >= 1, found {which!r}")
        return FileReference(
            path=_field(header, "path", (str,), required=True),
            which=which,
            header={"spectrum_id": spectrum_id, **_identity_fields(header)},
        )
    if kind != "inline":
        raise InputError("invalid_field", f"header field 'kind' must be 'inline' or 'reference', found {kind!r}")
    dtype = header.get("dtype")
    if dtype not in DTYPES:
        raise InputError("wrong_dtype", f"dtype must be one of {DTYPES}, found {dtype!r}")
    n_pixels = _field(header, "n_pixels", (int,), required=True)
    uncertainty = header.get("uncertainty", "ivar")
    if uncertainty not in ("ivar", "error"):
        raise InputError("invalid_field", f"'uncertainty' must be 'ivar' or 'error', found {uncertainty!r}")
    itemsize = np.dtype(dtype).itemsize
    if n_pixels < 0 or len(payload) != 2 * n_pixels * itemsize:
        raise InputError(
            "wrong_shape",
            f"payload of {len(payload)} bytes does not hold 2 x {n_pixels} values of {dtype}",
        )
    # read-only views of the message's bytes, not copies: the batch's stack is their one copy
    flux, second = np.frombuffer(payload, dtype=dtype).reshape(2, n_pixels)
    spectrum_kind = header.get("spectrum_kind", "coadd")
    return Spectrum(
        spectrum_id=spectrum_id,
        flux=flux,
        ivar=second if uncertainty == "ivar" else ivar_from_error(second),
        kind=spectrum_kind,
        visit=_field(header, "visit", (int,)),
        origin="inline",
        **_identity_fields(header),
    )


def dead_letter_headers(
    original: list[tuple[str, bytes]] | None, reason: str, message: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """The original headers plus why and where the message failed, for the dead-letter topic."""
    extra = {
        "dlq.reason": reason,
        "dlq.message": message[:2000].encode("utf-8", "backslashreplace").decode(),
        "dlq.source.topic": topic,
        "dlq.source.partition": str(partition),
        "dlq.source.offset": str(offset),
        "dlq.worker_version": __version__,
        "dlq.failed_at": utc_now(),
    }
    kept = [(k, v) for k, v in (original or []) if not k.startswith("dlq.")]
    return kept + [(k, v.encode()) for k, v in extra.items()]
