"""Message formats v1 (docs/messages.md): the input envelope both ways, every rejection with its
reason code, file references and their data roots, and what the pipeline publishes (results and
dead letters) checked against the JSON Schemas shipped in ``stream_worker/schemas``."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from importlib.resources import files
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from stream_worker.core.estimate import SCIENCE_FIELDS
from stream_worker.core.flags import ResultFlags
from stream_worker.core.grid import N_PIXELS
from stream_worker.core.spectrum import InputError, Spectrum
from stream_worker.engine.estimator import Estimator
from stream_worker.io.files import FileReader
from stream_worker.io.serializers.json_records import RESULT_CONTENT_TYPE
from stream_worker.io.wire import (
    CONTENT_TYPE,
    MAX_HEADER_BYTES,
    FileReference,
    decode_input,
    encode_inline,
    encode_reference,
)
from stream_worker.streaming.batch import Pipeline, stacked_rows
from tests.helpers import DATA, DWARF_FILE, GIANT_FILE, Explodes, consumed, small_model, synthetic_spectra

DOCS = Path(__file__).resolve().parents[1] / "docs" / "messages.md"
GIANT_ID = "2M17335483-2753043"


# ---------------------------------------------------------------------------------------------
# helpers


def load_schema(name: str) -> dict:
    return json.loads((files("stream_worker") / "schemas" / name).read_text(encoding="utf-8"))


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


HEADER_SCHEMA = validator("input-header.v1.json")
RESULT_SCHEMA = validator("result.v2.json")
DLQ_SCHEMA = validator("dead-letter-headers.v1.json")
REASONS = frozenset(load_schema("dead-letter-headers.v1.json")["properties"]["dlq.reason"]["enum"])


def frame(header: dict | bytes, payload: bytes = b"", length: int | None = None) -> bytes:
    """The envelope built by hand from the documented layout, independently of stream_worker."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"APSP" + struct.pack("<I", len(raw) if length is None else length) + raw + payload


def split(value: bytes) -> tuple[dict, bytes]:
    magic, length = struct.unpack_from("<4sI", value)
    assert magic == b"APSP"
    return json.loads(value[8 : 8 + length]), value[8 + length :]


def strict_json(data: bytes):
    """Parses JSON refusing NaN and infinities (which Python's json would accept)."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(data, parse_constant=refuse)


def dlq_headers(outgoing) -> dict[str, str]:
    return {k: v.decode() for k, v in outgoing.headers if k.startswith("dlq.")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Module-wide: see tests/conftest.py."""


@pytest.fixture(scope="module")
def spectra():
    return synthetic_spectra(4, seed=21)


@pytest.fixture(scope="module")
def spectrum(spectra):
    flux, ivar = spectra
    return Spectrum(
        "apStar-x:visit2", flux[0].copy(), ivar[0].copy(), source_id="2M00000000+0000000", kind="visit",
        visit=2, telescope="apo25m", mjd=59000.25,
    )


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def pipeline(model):
    return Pipeline(Estimator(model, num_draws=3), FileReader([str(DATA)]), "apogee.results", "apogee.deadletter",
                    4_000_000)


def inline_header(**changes) -> dict:
    header = {"schema_version": 1, "kind": "inline", "spectrum_id": "s", "n_pixels": N_PIXELS, "dtype": "<f4",
              "uncertainty": "ivar"}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not DELETE}


DELETE = object()
GOOD_PAYLOAD = np.ones(2 * N_PIXELS, "<f4").tobytes()


# ---------------------------------------------------------------------------------------------
# round trips


def test_inline_round_trip_with_ivar(spectrum):
    value = encode_inline(spectrum)
    header, payload = split(value)
    assert value[:4] == b"APSP" and struct.unpack_from("<I", value, 4)[0] == len(value) - 8 - len(payload)
    assert len(payload) == 2 * N_PIXELS * 4
    HEADER_SCHEMA.validate(header)
    assert header == {
        "schema_version": 1, "kind": "inline", "spectrum_id": "apStar-x:visit2", "source_id": "2M00000000+0000000",
        "telescope": "apo25m", "spectrum_kind": "visit", "visit": 2, "mjd": 59000.25, "n_pixels": N_PIXELS,
        "dtype": "<f4", "uncertainty": "ivar",
    }
    decoded = decode_input(value)
    assert isinstance(decoded, Spectrum)
    np.testing.assert_array_equal(decoded.flux, spectrum.flux)  # NaN chip gaps included
    np.testing.assert_array_equal(decoded.ivar, spectrum.ivar)
    assert decoded.metadata() == {**spectrum.metadata(), "origin": "inline"}


def test_inline_round_trip_with_error_becomes_ivar(spectrum):
    value = encode_inline(spectrum, uncertainty="error")
    header, payload = split(value)
    HEADER_SCHEMA.validate(header)
    assert header["uncertainty"] == "error"
    error = np.frombuffer(payload, "<f4")[N_PIXELS:]
    assert np.isinf(error[spectrum.ivar == 0]).all()
    decoded = decode_input(value)
    assert decoded.ivar.dtype == np.float32
    np.testing.assert_allclose(decoded.ivar, spectrum.ivar, rtol=1e-5)
    assert (decoded.ivar[spectrum.ivar == 0] == 0).all()


def test_error_without_information_is_ivar_zero():
    error = np.full(N_PIXELS, 2.0)
    error[:5] = [0.0, -1.0, np.nan, np.inf, -np.inf]
    value = frame(inline_header(uncertainty="error", dtype="<f8"), np.ones(N_PIXELS).tobytes() + error.tobytes())
    decoded = decode_input(value)
    assert list(decoded.ivar[:6]) == [0, 0, 0, 0, 0, 0.25]


def test_float64_round_trip(spectrum):
    value = encode_inline(spectrum, dtype="<f8")
    header, payload = split(value)
    HEADER_SCHEMA.validate(header)
    assert header["dtype"] == "<f8" and len(payload) == 2 * N_PIXELS * 8
    decoded = decode_input(value)
    assert decoded.flux.dtype == np.float64
    np.testing.assert_array_equal(decoded.flux.astype(np.float32), spectrum.flux)


def test_inline_arrays_are_views_of_the_message_not_copies(spectrum):
    value = encode_inline(spectrum)
    decoded = decode_input(value)
    message = np.frombuffer(value, np.uint8)
    for array in (decoded.flux, decoded.ivar):
        assert np.shares_memory(array, message) and not array.flags.writeable


def test_float64_values_keep_their_precision():
    flux = np.linspace(1.0, 2.0, N_PIXELS) + 1e-12
    decoded = decode_input(frame(inline_header(dtype="<f8"), flux.tobytes() + np.ones(N_PIXELS).tobytes()))
    np.testing.assert_array_equal(decoded.flux, flux)


@pytest.mark.parametrize("which", ["coadd", 1, 3])
def test_reference_round_trip(which):
    value = encode_reference(str(GIANT_FILE), which, source_id=GIANT_ID)
    header, payload = split(value)
    assert payload == b""
    HEADER_SCHEMA.validate(header)
    decoded = decode_input(value)
    assert isinstance(decoded, FileReference)
    assert decoded.path == str(GIANT_FILE) and decoded.which == which
    label = "coadd" if which == "coadd" else f"visit{which}"
    assert decoded.header["spectrum_id"] == f"{GIANT_FILE.stem}:{label}"
    assert decoded.header["source_id"] == GIANT_ID


def test_reference_which_defaults_to_coadd():
    decoded = decode_input(frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r", "path": "/x.fits"}))
    assert decoded.which == "coadd"


def test_inline_defaults():
    """spectrum_kind defaults to coadd and uncertainty to ivar; the identity fields may be absent."""
    decoded = decode_input(frame(inline_header(uncertainty=DELETE), GOOD_PAYLOAD))
    assert decoded.kind == "coadd" and decoded.visit is None and decoded.source_id is None
    np.testing.assert_array_equal(decoded.ivar, np.ones(N_PIXELS, np.float32))


def test_unknown_header_fields_are_ignored():
    header = inline_header(producer="team-x", extra={"a": [1, 2]})
    HEADER_SCHEMA.validate(header)
    assert isinstance(decode_input(frame(header, GOOD_PAYLOAD)), Spectrum)


def test_documented_producer_example_makes_messages_the_worker_accepts(pipeline, spectra):
    """The first python block of docs/messages.md, run as written, without stream_worker."""
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text[text.index("### Worked example") :], re.S).group(1)
    assert "stream_worker" not in block
    namespace: dict = {}
    exec(compile(block, str(DOCS), "exec"), namespace)
    flux, ivar = spectra
    for dtype in ("<f4", "<f8"):
        value = namespace["encode_spectrum"]("doc:visit2", flux[1], ivar[1], source_id=GIANT_ID, telescope="apo25m",
                                             spectrum_kind="visit", visit=2, mjd=56433.38234, dtype=dtype)
        HEADER_SCHEMA.validate(split(value)[0])
        decoded = pipeline.decode(consumed(value))
        assert decoded.spectrum_id == "doc:visit2" and decoded.kind == "visit" and decoded.visit == 2
        np.testing.assert_array_equal(decoded.flux, flux[1])
    reference = namespace["encode_reference"]("doc:ref", str(GIANT_FILE), 2)
    HEADER_SCHEMA.validate(split(reference)[0])
    assert pipeline.decode(consumed(reference)).mjd == pytest.approx(56433.38234)
    for example in re.findall(r"```json\n(.*?)```", text, re.S)[:2]:
        HEADER_SCHEMA.validate(json.loads(example))


# ---------------------------------------------------------------------------------------------
# every decode error path; the header schema must reject what the decoder rejects for the header


def _prefix(length: int) -> bytes:
    return struct.pack("<4sI", b"APSP", length)


NOT_AN_OBJECT = None  # schema verdict: the header is not a JSON object at all
DECODE_ERRORS = [
    # (id, value, reason, header valid for the schema?)
    ("tombstone", None, "decode_error", NOT_AN_OBJECT),
    ("empty", b"", "decode_error", NOT_AN_OBJECT),
    ("short", b"APSP\x00\x00", "decode_error", NOT_AN_OBJECT),
    ("bad-magic", b"APSQ" + frame(inline_header())[4:], "decode_error", NOT_AN_OBJECT),
    ("lowercase-magic", b"apsp" + frame(inline_header())[4:], "decode_error", NOT_AN_OBJECT),
    ("header-beyond-message", _prefix(100) + b"{}", "decode_error", NOT_AN_OBJECT),
    ("header-length-over-limit", _prefix(MAX_HEADER_BYTES + 1) + b"{" + b" " * MAX_HEADER_BYTES + b"}",
     "decode_error", NOT_AN_OBJECT),
    ("header-not-utf8", frame(b'{"spectrum_id": "\xff\xfe"}'), "decode_error", NOT_AN_OBJECT),
    ("header-not-json", frame(b"{schema_version: 1}"), "decode_error", NOT_AN_OBJECT),
    ("header-cut-short", frame(json.dumps(inline_header()).encode()[:-1]), "decode_error", NOT_AN_OBJECT),
    ("header-nested-too-deep", frame(b"[" * 100_000 + b"]" * 100_000), "decode_error", NOT_AN_OBJECT),
    ("header-array", frame(b"[1, 2]"), "decode_error", NOT_AN_OBJECT),
    ("header-string", frame(b'"APSP"'), "decode_error", NOT_AN_OBJECT),
    ("header-null", frame(b"null"), "decode_error", NOT_AN_OBJECT),
    ("no-schema-version", frame(inline_header(schema_version=DELETE), GOOD_PAYLOAD), "schema_version", False),
    ("schema-version-2", frame(inline_header(schema_version=2), GOOD_PAYLOAD), "schema_version", False),
    ("schema-version-0", frame(inline_header(schema_version=0), GOOD_PAYLOAD), "schema_version", False),
    ("schema-version-string", frame(inline_header(schema_version="1"), GOOD_PAYLOAD), "schema_version", False),
    ("schema-version-null", frame(inline_header(schema_version=None), GOOD_PAYLOAD), "schema_version", False),
    ("no-spectrum-id", frame(inline_header(spectrum_id=DELETE), GOOD_PAYLOAD), "invalid_field", False),
    ("null-spectrum-id", frame(inline_header(spectrum_id=None), GOOD_PAYLOAD), "invalid_field", False),
    ("numeric-spectrum-id", frame(inline_header(spectrum_id=17), GOOD_PAYLOAD), "invalid_field", False),
    ("no-kind", frame(inline_header(kind=DELETE), GOOD_PAYLOAD), "invalid_field", False),
    ("bad-kind", frame(inline_header(kind="blob"), GOOD_PAYLOAD), "invalid_field", False),
    ("kind-capitalised", frame(inline_header(kind="Inline"), GOOD_PAYLOAD), "invalid_field", False),
    ("no-dtype", frame(inline_header(dtype=DELETE), GOOD_PAYLOAD), "wrong_dtype", False),
    ("big-endian", frame(inline_header(dtype=">f4"), GOOD_PAYLOAD), "wrong_dtype", False),
    ("numpy-name", frame(inline_header(dtype="float32"), GOOD_PAYLOAD), "wrong_dtype", False),
    ("half", frame(inline_header(dtype="<f2"), GOOD_PAYLOAD), "wrong_dtype", False),
    ("integer-dtype", frame(inline_header(dtype="<i4"), GOOD_PAYLOAD), "wrong_dtype", False),
    ("no-n-pixels", frame(inline_header(n_pixels=DELETE), GOOD_PAYLOAD), "invalid_field", False),
    ("string-n-pixels", frame(inline_header(n_pixels="8575"), GOOD_PAYLOAD), "invalid_field", False),
    # JSON Schema cannot tell 8575.0 from 8575 (both are the integer 8575); the decoder can and
    # refuses the former, hence "write integers without a fraction" in docs/messages.md
    ("float-n-pixels", frame(inline_header(n_pixels=8575.0), GOOD_PAYLOAD), "invalid_field", True),
    ("bad-uncertainty", frame(inline_header(uncertainty="sigma"), GOOD_PAYLOAD), "invalid_field", False),
    ("null-uncertainty", frame(inline_header(uncertainty=None), GOOD_PAYLOAD), "invalid_field", False),
    ("numeric-source-id", frame(inline_header(source_id=5), GOOD_PAYLOAD), "invalid_field", False),
    ("list-telescope", frame(inline_header(telescope=["apo25m"]), GOOD_PAYLOAD), "invalid_field", False),
    ("string-visit", frame(inline_header(visit="1"), GOOD_PAYLOAD), "invalid_field", False),
    ("boolean-visit", frame(inline_header(visit=True), GOOD_PAYLOAD), "invalid_field", False),
    ("string-mjd", frame(inline_header(mjd="59000"), GOOD_PAYLOAD), "invalid_field", False),
    ("boolean-mjd", frame(inline_header(mjd=False), GOOD_PAYLOAD), "invalid_field", False),
    ("payload-one-byte-short", frame(inline_header(), GOOD_PAYLOAD[:-1]), "wrong_shape", True),
    ("payload-one-byte-long", frame(inline_header(), GOOD_PAYLOAD + b"\0"), "wrong_shape", True),
    ("payload-one-array", frame(inline_header(), GOOD_PAYLOAD[: N_PIXELS * 4]), "wrong_shape", True),
    ("payload-missing", frame(inline_header()), "wrong_shape", True),
    ("f8-header-f4-payload", frame(inline_header(dtype="<f8"), GOOD_PAYLOAD), "wrong_shape", True),
    ("negative-n-pixels", frame(inline_header(n_pixels=-1)), "wrong_shape", False),
    ("reference-with-payload",
     frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r", "path": "/x.fits"}, b"\0"),
     "decode_error", True),
    ("reference-without-path", frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r"}),
     "invalid_field", False),
    ("reference-numeric-path", frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r", "path": 7}),
     "invalid_field", False),
] + [
    (f"which-{which!r}",
     frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r", "path": "/x.fits", "which": which}),
     "invalid_field", False)
    for which in (0, -1, "visit1", "COADD", 1.5, True, None, [1], {"visit": 1})
] + [
    ("which-2.0",
     frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r", "path": "/x.fits", "which": 2.0}),
     "invalid_field", True),  # as float-n-pixels
]


@pytest.mark.parametrize(("value", "reason", "schema_verdict"), [c[1:] for c in DECODE_ERRORS],
                         ids=[c[0] for c in DECODE_ERRORS])
def test_decode_errors_have_their_reason(value, reason, schema_verdict):
    with pytest.raises(InputError) as caught:
        decode_input(value)
    assert caught.value.reason == reason
    assert reason in REASONS
    assert str(caught.value)  # a message for people
    if schema_verdict is not NOT_AN_OBJECT:
        header, _ = split(value)
        assert HEADER_SCHEMA.is_valid(header) is schema_verdict


OVERFLOW_WARNING = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
VALIDATION_ERRORS = [
    pytest.param(inline_header(spectrum_id=""), GOOD_PAYLOAD, "invalid_field", id="empty-spectrum-id"),
    pytest.param(inline_header(spectrum_kind="combined"), GOOD_PAYLOAD, "invalid_field", id="bad-spectrum-kind"),
    pytest.param(inline_header(spectrum_kind=None), GOOD_PAYLOAD, "invalid_field", id="null-spectrum-kind"),
    pytest.param(inline_header(n_pixels=100), np.ones(200, "<f4").tobytes(), "wrong_shape", id="wrong-grid-length"),
    pytest.param(inline_header(n_pixels=0), b"", "wrong_shape", id="zero-pixels"),
    pytest.param(inline_header(), np.full(N_PIXELS, np.nan, "<f4").tobytes() + np.ones(N_PIXELS, "<f4").tobytes(),
                 "all_nan_flux", id="all-nan-flux"),
    pytest.param(inline_header(), np.full(N_PIXELS, np.inf, "<f4").tobytes() + np.ones(N_PIXELS, "<f4").tobytes(),
                 "all_nan_flux", id="all-infinite-flux"),
    pytest.param(inline_header(dtype="<f8"), np.full(N_PIXELS, 1e300).tobytes() + np.ones(N_PIXELS).tobytes(),
                 "all_nan_flux", id="flux-beyond-float32", marks=OVERFLOW_WARNING),
]


@pytest.mark.parametrize(("header", "payload", "reason"), VALIDATION_ERRORS)
def test_validation_errors_have_their_reason(pipeline, header, payload, reason):
    """Rejected after decoding, by validate_spectrum: only Pipeline.decode sees them."""
    with pytest.raises(InputError) as caught:
        pipeline.decode(consumed(frame(header, payload)))
    assert caught.value.reason == reason
    assert HEADER_SCHEMA.is_valid(header) is (reason == "all_nan_flux")  # the others are header errors


def test_one_finite_flux_pixel_is_enough(pipeline):
    flux = np.full(N_PIXELS, np.nan, "<f4")
    flux[1234] = 5.0
    decoded = pipeline.decode(consumed(frame(inline_header(), flux.tobytes() + np.ones(N_PIXELS, "<f4").tobytes())))
    assert decoded.flux.dtype == np.float32 and decoded.flux[1234] == 5.0


def test_the_envelope_limit_is_inclusive():
    header = inline_header(pad="x" * MAX_HEADER_BYTES)
    raw = json.dumps(header).encode()
    raw = raw.replace(b"x" * (len(raw) - MAX_HEADER_BYTES), b"", 1)
    assert len(raw) == MAX_HEADER_BYTES
    assert isinstance(decode_input(frame(raw, GOOD_PAYLOAD)), Spectrum)


# ---------------------------------------------------------------------------------------------
# the records the pipeline publishes


def _inline_messages(spectra, n, first_offset=0):
    flux, ivar = spectra
    return [
        consumed(encode_inline(Spectrum(f"s{i}", flux[i], ivar[i], source_id=f"2M{i:08d}", telescope="lco25m")),
                 key=f"s{i}".encode(), offset=first_offset + i, headers=[("content-type", CONTENT_TYPE.encode())])
        for i in range(n)
    ]


def _results(batch):
    return [o for o in batch.outgoing if o.topic == "apogee.results"]


def test_published_records_validate_against_the_result_schema(pipeline, spectra):
    messages = _inline_messages(spectra, 3) + [
        consumed(encode_reference(str(GIANT_FILE), 2, spectrum_id="ref:visit2"), key=b"ref:visit2", offset=3),
        consumed(encode_reference(str(DWARF_FILE), "coadd", spectrum_id="ref:dwarf", telescope="apo25m"), offset=4),
    ]
    batch = pipeline.run(messages)
    outgoing = _results(batch)
    assert len(outgoing) == len(batch.outgoing) == len(batch.records) == 5
    for out, message in zip(outgoing, messages):
        record = strict_json(out.value)
        RESULT_SCHEMA.validate(record)
        assert out.key == record["spectrum_id"].encode()
        assert out.headers == [("content-type", RESULT_CONTENT_TYPE.encode())]
        assert set(record) == set(load_schema("result.v2.json")["required"])
        assert (record["input_topic"], record["input_partition"], record["input_offset"],
                record["input_timestamp_ms"]) == (message.topic, message.partition, message.offset, message.timestamp)
        assert record["model_name"] == "random-untrained" and record["model_trained"] is False
        assert all(record[name] is not None for name in SCIENCE_FIELDS)
    inline, visit, dwarf = (strict_json(outgoing[i].value) for i in (0, 3, 4))
    assert inline["origin"] == "inline" and inline["source_id"] == "2M00000000" and inline["telescope"] == "lco25m"
    assert (visit["spectrum_kind"], visit["visit"], visit["source_id"]) == ("visit", 2, GIANT_ID)
    assert visit["mjd"] == pytest.approx(56433.38234) and visit["origin"] == str(GIANT_FILE)
    assert (dwarf["spectrum_kind"], dwarf["visit"], dwarf["mjd"], dwarf["telescope"]) == ("coadd", None, None, "apo25m")


def test_records_of_a_redelivered_spectrum_have_the_same_science_fields(pipeline, spectra):
    messages = _inline_messages(spectra, 4)
    first = strict_json(_results(pipeline.run(messages[1:2]))[0].value)
    again = strict_json(_results(pipeline.run([messages[1]._replace(offset=99)]))[0].value)
    crowded = strict_json(_results(pipeline.run(messages))[1].value)
    assert {k: first[k] for k in SCIENCE_FIELDS} == {k: again[k] for k in SCIENCE_FIELDS}
    assert again["input_offset"] == 99
    # with other batch companions: equal up to float32 rounding (docs/messages.md)
    for name in ("teff", "logg", "fe_h"):
        assert crowded[name] == pytest.approx(first[name], rel=1e-6)
    for name in ("e_teff", "e_logg", "e_fe_h", "raw_e_teff", "raw_e_logg", "raw_e_fe_h"):
        assert crowded[name] == pytest.approx(first[name], rel=1e-4)
    assert crowded["result_flags"] == first["result_flags"]




def test_stacked_rows_are_one_writable_copy_each_row_in_its_dtype():
    rows = [np.frombuffer(np.arange(i, i + 3, dtype=dtype).tobytes(), dtype)  # read-only, as decoded
            for i, dtype in enumerate(["<f4", "<f8", ">f4", "<f4"])]
    stacked = stacked_rows(rows)
    assert [row.dtype.name for row in stacked] == ["float32", "float64", "float32", "float32"]  # byte order aside
    assert [list(row) for row in stacked] == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert all(row.flags.writeable and not np.shares_memory(row, original) for row, original in zip(stacked, rows))
    same = stacked_rows([rows[0], rows[3]])
    assert isinstance(same, np.ndarray) and same.shape == (2, 3) and same.flags.writeable


def test_a_batch_of_float32_and_float64_messages_gives_each_spectrum_its_own_numbers(pipeline, spectra):
    flux, ivar = spectra
    messages = [consumed(encode_inline(Spectrum(f"s{i}", flux[i], ivar[i]), dtype=dtype), key=f"s{i}".encode(),
                         offset=i) for i, dtype in enumerate(["<f4", "<f8", "<f4", "<f8"])]
    together = [strict_json(item.value) for item in _results(pipeline.run(messages))]
    alone = [strict_json(_results(pipeline.run([message]))[0].value) for message in messages]
    assert [record["spectrum_id"] for record in together] == ["s0", "s1", "s2", "s3"]
    assert len({record["teff"] for record in together}) == 4
    for crowded, single in zip(together, alone):
        for name in SCIENCE_FIELDS:
            assert crowded[name] == pytest.approx(single[name], rel=1e-4), name


def test_runtime_exception_record_validates(model, spectra):
    flux, ivar = (a.copy() for a in spectra)
    flux[1, 400] = 1500.0
    pipeline = Pipeline(Estimator(Explodes(model), num_draws=3), FileReader([]), "apogee.results",
                        "apogee.deadletter", 4_000_000)
    messages = [consumed(encode_inline(Spectrum(f"x{i}", flux[i], ivar[i])), offset=i) for i in range(3)]
    records = [strict_json(o.value) for o in _results(pipeline.run(messages))]
    assert len(records) == 3
    for record in records:
        RESULT_SCHEMA.validate(record)
    bad = records[1]
    assert bad["result_flags"] == ResultFlags.RUNTIME_EXCEPTION
    assert bad["flag_bad"] is True and bad["flag_warn"] is False
    assert all(bad[name] is None for name in SCIENCE_FIELDS[:9])
    assert bad["error_message"] == "RuntimeError: boom"
    assert records[0]["teff"] is not None and records[2]["error_message"] is None


def test_zero_draws_record_validates(model, spectra):
    pipeline = Pipeline(Estimator(model, num_draws=0), FileReader([]), "apogee.results", "apogee.deadletter",
                        4_000_000)
    record = strict_json(_results(pipeline.run(_inline_messages(spectra, 1)))[0].value)
    RESULT_SCHEMA.validate(record)
    assert math.isfinite(record["teff"]) and math.isfinite(record["logg"]) and math.isfinite(record["fe_h"])
    assert all(record[name] is None for name in ("e_teff", "e_logg", "e_fe_h", "raw_e_teff", "raw_e_logg",
                                                 "raw_e_fe_h"))


@pytest.fixture(scope="module")
def clean_record(pipeline, spectra) -> dict:
    record = strict_json(_results(pipeline.run(_inline_messages(spectra, 1)))[0].value)
    assert record["result_flags"] == 0  # the changes below assume a clean record
    RESULT_SCHEMA.validate(record)
    return record


@pytest.mark.parametrize(
    "change",
    [
        {"unexpected": 1},
        {"teff": None},  # parameters missing without flag_runtime_exception
        {"result_flags": 1},  # flag_runtime_exception with parameters
        {"result_flags": 16},
        {"flag_bad": True},
        {"flag_warn": True},
        {"e_teff": None},  # some uncertainties null, others not
        {"weights_sha256": "abc"},
        {"spectrum_kind": "combined"},
        {"published_at": "yesterday"},
        {"schema_version": 1},
        {"engine_plan": ""},
        {"error_message": "RuntimeError: boom"},
    ],
    ids=repr,
)
def test_result_schema_rejects_inconsistent_records(clean_record, change):
    assert not RESULT_SCHEMA.is_valid({**clean_record, **change})


def test_result_schema_requires_every_field(clean_record):
    for name in clean_record:
        assert not RESULT_SCHEMA.is_valid({k: v for k, v in clean_record.items() if k != name}), name


# ---------------------------------------------------------------------------------------------
# dead letters


def test_dead_letters_keep_key_value_and_headers(pipeline, spectra):
    good = _inline_messages(spectra, 1)[0]
    bad_value = frame(inline_header(dtype=">f4"), GOOD_PAYLOAD)
    headers = [("content-type", CONTENT_TYPE.encode()), ("trace-id", b"\x00\xffbinary"),
               ("dlq.reason", b"from-an-earlier-life")]
    bad = consumed(bad_value, key=b"the-key", offset=41, partition=3, headers=headers)
    tombstone = consumed(None, key=b"gone", offset=42)
    batch = pipeline.run([good, bad, tombstone])
    assert len(batch.outgoing) == 3 and len(batch.records) == 1
    assert [d.reason for d in batch.dead_letters] == ["wrong_dtype", "decode_error"]
    letters = [o for o in batch.outgoing if o.topic == "apogee.deadletter"]
    assert len(letters) == 2
    first, second = letters
    assert (first.key, first.value) == (b"the-key", bad_value)
    assert first.headers[:2] == headers[:2]  # originals first, unchanged; stale dlq.* replaced
    assert [k for k, _ in first.headers].count("dlq.reason") == 1
    meta = dlq_headers(first)
    DLQ_SCHEMA.validate(meta)
    assert meta["dlq.reason"] == "wrong_dtype" and "'>f4'" in meta["dlq.message"]
    assert (meta["dlq.source.topic"], meta["dlq.source.partition"], meta["dlq.source.offset"]) == (
        "apogee.spectra", "3", "41")
    assert (second.key, second.value) == (b"gone", b"")
    DLQ_SCHEMA.validate(dlq_headers(second))
    assert dlq_headers(second)["dlq.reason"] == "decode_error"


def test_every_documented_reason_is_a_dead_letter_reason():
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text[text.index("Reason codes:") :], re.M))
    assert documented == REASONS


def test_dead_letter_message_is_bounded(pipeline):
    reader_error = InputError("missing_file", "x" * 5000)

    class Failing(FileReader):
        def read(self, reference):
            raise reader_error

    failing = Pipeline(pipeline.estimator, Failing([str(DATA)]), "apogee.results", "apogee.deadletter", 4_000_000)
    batch = failing.run([consumed(encode_reference(str(GIANT_FILE)))])
    meta = dlq_headers(batch.outgoing[0])
    DLQ_SCHEMA.validate(meta)
    assert meta["dlq.reason"] == "missing_file" and len(meta["dlq.message"]) == 2000


def test_unexpected_exceptions_become_internal_error_dead_letters(pipeline, spectra):
    class Broken(FileReader):
        def read(self, reference):
            raise KeyError("no such thing")

    broken = Pipeline(pipeline.estimator, Broken([str(DATA)]), "apogee.results", "apogee.deadletter", 4_000_000)
    good = _inline_messages(spectra, 1)[0]
    batch = broken.run([consumed(encode_reference(str(GIANT_FILE)), key=b"r"), good])
    assert len(batch.outgoing) == 2 and len(batch.records) == 1
    letter = next(o for o in batch.outgoing if o.topic == "apogee.deadletter")
    meta = dlq_headers(letter)
    DLQ_SCHEMA.validate(meta)
    assert meta["dlq.reason"] == "internal_error" and meta["dlq.message"] == "KeyError: 'no such thing'"


def test_oversized_messages_are_dead_lettered_without_their_value(model, spectra):
    good = _inline_messages(spectra, 1)[0]
    size = len(good.value)
    pipeline = Pipeline(Estimator(model, num_draws=0), FileReader([]), "apogee.results", "apogee.deadletter", size)
    batch = pipeline.run([good])  # exactly the limit: accepted
    assert len(batch.records) == 1 and not batch.dead_letters
    pipeline.max_message_bytes = size - 1
    with pytest.raises(InputError) as caught:
        pipeline.decode(good)
    assert caught.value.reason == "oversized"
    big = consumed(b"\0" * (10 * size), key=b"big", offset=7, headers=[("content-type", CONTENT_TYPE.encode())])
    batch = pipeline.run([good, big])
    assert len(batch.outgoing) == 2 and not batch.records
    for letter, original in zip(batch.outgoing, (good, big)):
        assert letter.topic == "apogee.deadletter" and letter.key == original.key and letter.value == b""
        assert letter.headers[0] == ("content-type", CONTENT_TYPE.encode())
        meta = dlq_headers(letter)
        DLQ_SCHEMA.validate(meta)
        assert meta["dlq.reason"] == "oversized"
        assert meta["dlq.original_size"] == str(len(original.value))


def test_dead_letter_header_schema_rejects_strays():
    good = {"dlq.reason": "oversized", "dlq.message": "m", "dlq.source.topic": "t", "dlq.source.partition": "0",
            "dlq.source.offset": "1", "dlq.worker_version": "0.1.0", "dlq.failed_at": "2026-01-01T00:00:00.000Z"}
    DLQ_SCHEMA.validate(good)
    for bad in ({**good, "dlq.reason": "other"}, {**good, "dlq.extra": "x"}, {**good, "dlq.source.offset": "-1"},
                {k: v for k, v in good.items() if k != "dlq.reason"}, {**good, "dlq.original_size": 5}):
        assert not DLQ_SCHEMA.is_valid(bad)


# ---------------------------------------------------------------------------------------------
# file references and the data roots


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root with the real apStar files, a sibling directory outside it, and traps."""
    base = tmp_path_factory.mktemp("storage")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    shutil.copy(GIANT_FILE, root / "sub" / GIANT_FILE.name)
    shutil.copy(DWARF_FILE, root / DWARF_FILE.name)
    (base / "root-sibling").mkdir()
    shutil.copy(DWARF_FILE, base / "root-sibling" / DWARF_FILE.name)
    shutil.copy(DWARF_FILE, base / "outside.fits")
    (root / "link-out.fits").symlink_to(base / "outside.fits")
    (root / "link-in.fits").symlink_to(root / DWARF_FILE.name)
    (root / "dir-link").symlink_to(base / "root-sibling", target_is_directory=True)
    (root / "notes.fits").write_text("SIMPLE = not really a FITS file\n")
    (root / "empty.fits").write_bytes(b"")
    data = (root / "sub" / GIANT_FILE.name).read_bytes()
    (root / "truncated.fits").write_bytes(data[: len(data) // 2])
    return root


def reference(path, which="coadd", **header) -> FileReference:
    value = encode_reference(str(path), which, spectrum_id="ref", **header)
    decoded = decode_input(value)
    assert isinstance(decoded, FileReference)
    return decoded


def read_reason(reader: FileReader, path, which="coadd") -> str:
    with pytest.raises(InputError) as caught:
        reader.read(reference(path, which))
    assert caught.value.reason in REASONS
    return caught.value.reason


def test_reference_under_the_data_root_is_read(root):
    reader = FileReader([str(root)])
    coadd = reader.read(reference(root / "sub" / GIANT_FILE.name))
    assert coadd.spectrum_id == "ref" and coadd.kind == "coadd" and coadd.source_id == GIANT_ID
    assert coadd.flux.shape == (N_PIXELS,) and coadd.origin == str(root / "sub" / GIANT_FILE.name)
    visit = reader.read(reference(root / "sub" / GIANT_FILE.name, 3, source_id="mine", telescope="apo25m", mjd=1.5))
    assert (visit.kind, visit.visit, visit.source_id, visit.telescope, visit.mjd) == ("visit", 3, "mine", "apo25m", 1.5)
    single = reader.read(reference(root / DWARF_FILE.name, 1))
    assert single.visit == 1 and np.isfinite(single.flux).any()
    assert reader.read(reference(root / "link-in.fits")).source_id == "2M19485057+5005279"
    assert reader.read(reference(f"{root}/sub/../{DWARF_FILE.name}")).kind == "coadd"


def test_reference_through_the_pipeline_matches_the_file(pipeline):
    spectrum = pipeline.decode(consumed(encode_reference(str(GIANT_FILE), 1, spectrum_id="p")))
    from stream_worker.io.apstar import read_apstar_spectra

    (direct,) = read_apstar_spectra(GIANT_FILE, [1])
    np.testing.assert_array_equal(spectrum.flux, direct.flux)
    np.testing.assert_array_equal(spectrum.ivar, direct.ivar)


def test_data_roots_expand_environment_variables(root, monkeypatch):
    monkeypatch.setenv("APOGEE_TEST_ROOT", str(root))
    assert FileReader(["$APOGEE_TEST_ROOT/sub"]).read(reference(root / "sub" / GIANT_FILE.name)).kind == "coadd"


@pytest.mark.parametrize(
    "where",
    [
        lambda root: GIANT_FILE,  # absolute path elsewhere
        lambda root: root.parent / "outside.fits",
        lambda root: f"{root}/../outside.fits",  # ../ traversal
        lambda root: f"{root}/sub/../../outside.fits",
        lambda root: root / "link-out.fits",  # symlink pointing outside
        lambda root: root / "dir-link" / DWARF_FILE.name,  # through a directory symlink
        lambda root: root.parent / "root-sibling" / DWARF_FILE.name,  # shares the root's name as a prefix
        lambda root: f"{root}/../nonexistent.fits",  # outside beats missing
        lambda root: "/",
        lambda root: "relative/path.fits",
    ],
    ids=["absolute", "parent", "dotdot", "dotdot-deep", "symlink", "dir-symlink", "prefix-sibling",
         "outside-missing", "filesystem-root", "relative"],
)
def test_paths_outside_the_data_roots_are_not_allowed(root, where):
    assert read_reason(FileReader([str(root)]), where(root)) == "path_not_allowed"


def test_no_data_roots_means_no_references(root):
    assert read_reason(FileReader([]), root / DWARF_FILE.name) == "path_not_allowed"


def test_several_data_roots(root):
    reader = FileReader([str(root / "sub"), str(root.parent / "root-sibling")])
    assert reader.read(reference(root.parent / "root-sibling" / DWARF_FILE.name)).kind == "coadd"
    assert reader.read(reference(root / "sub" / GIANT_FILE.name, 2)).visit == 2
    assert read_reason(reader, root / DWARF_FILE.name) == "path_not_allowed"


@pytest.mark.parametrize(
    ("name", "which", "reason"),
    [
        ("nonexistent.fits", "coadd", "missing_file"),
        ("sub/nonexistent/deeper.fits", "coadd", "missing_file"),
        ("sub", "coadd", "not_apstar"),
        (".", "coadd", "not_apstar"),
        ("notes.fits", "coadd", "not_apstar"),
        ("empty.fits", "coadd", "not_apstar"),
        ("truncated.fits", "coadd", "truncated_file"),
        (f"sub/{GIANT_FILE.name}", 4, "no_such_visit"),
        (f"sub/{GIANT_FILE.name}", 99, "no_such_visit"),
        (DWARF_FILE.name, 2, "no_such_visit"),
    ],
)
def test_unreadable_references_have_their_reason(root, name, which, reason):
    assert read_reason(FileReader([str(root)]), root / name, which) == reason


def test_non_apstar_fits_files_have_their_reason(tmp_path):
    from astropy.io import fits

    one_hdu = tmp_path / "one.fits"
    fits.PrimaryHDU(np.zeros(3)).writeto(one_hdu)
    off_grid = tmp_path / "grid.fits"
    image = fits.ImageHDU(np.ones((1, N_PIXELS), np.float32))
    image.header["CRVAL1"], image.header["CDELT1"] = 4.0, 6e-6
    fits.HDUList([fits.PrimaryHDU(), image, image.copy(), image.copy()]).writeto(off_grid)
    reader = FileReader([str(tmp_path)])
    assert read_reason(reader, one_hdu) == "not_apstar"
    assert read_reason(reader, off_grid) == "wrong_grid"


def test_reference_dead_letters_through_the_pipeline(root, model):
    pipeline = Pipeline(Estimator(model, num_draws=0), FileReader([str(root)]), "apogee.results",
                        "apogee.deadletter", 4_000_000)
    cases = {"../outside.fits": "path_not_allowed", "nonexistent.fits": "missing_file", "sub": "not_apstar",
             DWARF_FILE.name: None}
    messages = [consumed(encode_reference(f"{root}/{name}", spectrum_id=f"r{i}"), offset=i)
                for i, name in enumerate(cases)]
    batch = pipeline.run(messages)
    assert len(batch.outgoing) == 4 and len(batch.records) == 1
    assert sorted(d.reason for d in batch.dead_letters) == sorted(r for r in cases.values() if r)
    for letter in batch.outgoing:
        if letter.topic == "apogee.deadletter":
            DLQ_SCHEMA.validate(dlq_headers(letter))
        else:
            RESULT_SCHEMA.validate(strict_json(letter.value))


# ---------------------------------------------------------------------------------------------
# regressions found by fuzzing (fixed)


@pytest.mark.parametrize("override", [{"telescope": 5}, {"source_id": ["x"]}, {"mjd": "soon"}], ids=repr)
def test_reference_identity_overrides_are_type_checked(pipeline, override):
    message = consumed(frame({"schema_version": 1, "kind": "reference", "spectrum_id": "r", "path": str(GIANT_FILE),
                              **override}))
    with pytest.raises(InputError) as caught:
        pipeline.decode(message)
    assert caught.value.reason == "invalid_field"


def test_boolean_schema_version_is_not_version_1():
    header = inline_header(schema_version=True)
    assert not HEADER_SCHEMA.is_valid(header)
    with pytest.raises(InputError) as caught:
        decode_input(frame(header, GOOD_PAYLOAD))
    assert caught.value.reason == "schema_version"
