"""Fuzzing the input side (docs/messages.md): whatever arrives on the input topic,
``Pipeline.decode`` returns a validated :class:`Spectrum` or raises :class:`InputError` with a
documented reason code, never anything else; ``Pipeline.run`` returns exactly one outgoing
message per input, a result for every good input, and only standard JSON (no NaN, no infinity)
in the results; and decoding does not accumulate memory.

Generated strings contain no NUL and no surrogates, and path components stay short: those inputs
have targeted regression tests at the end of this file (each was a crash found by fuzzing).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import struct
import tracemalloc
from importlib.resources import files

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_worker.core.grid import N_PIXELS
from stream_worker.core.spectrum import SPECTRUM_KINDS, InputError, Spectrum
from stream_worker.engine.estimator import Estimator
from stream_worker.io.files import FileReader
from stream_worker.io.wire import DTYPES, encode_inline, encode_reference
from stream_worker.streaming.batch import Pipeline
from tests.helpers import DWARF_FILE, GIANT_FILE, consumed, small_model, synthetic_spectra

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # float64 → float32 inf
    pytest.mark.filterwarnings("ignore::RuntimeWarning:stream_worker.engine.preprocess"),  # numpy on garbage arrays
]

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_BATCH = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _schema(name: str) -> dict:
    return json.loads((files("stream_worker") / "schemas" / name).read_text(encoding="utf-8"))


REASONS = frozenset(_schema("dead-letter-headers.v1.json")["properties"]["dlq.reason"]["enum"])
RESULT_SCHEMA = jsonschema.Draft202012Validator(_schema("result.v2.json"))
DLQ_SCHEMA = jsonschema.Draft202012Validator(_schema("dead-letter-headers.v1.json"))
OUTPUT, DEAD = "apogee.results", "apogee.deadletter"

# --------------------------------------------------------------------------------------------
# the data root: real apStar files and the things a path can point at


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Module-wide: see tests/conftest.py."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzzroot")
    root = base / "root"
    (root / "dir").mkdir(parents=True)
    shutil.copy(DWARF_FILE, root / "dwarf.fits")
    shutil.copy(GIANT_FILE, root / "dir" / "giant.fits")
    (root / "notes.fits").write_bytes(b"not a FITS file\n" * 10)
    (root / "empty.fits").write_bytes(b"")
    shutil.copy(DWARF_FILE, base / "outside.fits")
    (root / "link-out.fits").symlink_to(base / "outside.fits")
    (root / "link-in.fits").symlink_to(root / "dwarf.fits")
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.fixture(scope="module")
def pipeline(root):
    return Pipeline(Estimator(small_model(), num_draws=2), FileReader([str(root)]), OUTPUT, DEAD, 1_000_000)


def frame(header, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"APSP" + struct.pack("<I", len(raw)) + raw + payload


def outcome(pipeline, value) -> Spectrum | str:
    """The validated spectrum, or the reason code; any other exception fails the test."""
    try:
        spectrum = pipeline.decode(consumed(value))
    except InputError as exc:
        assert exc.reason in REASONS, f"undocumented reason {exc.reason!r}: {exc}"
        assert str(exc)
        return exc.reason
    assert isinstance(spectrum, Spectrum)
    assert isinstance(spectrum.spectrum_id, str) and spectrum.spectrum_id
    assert spectrum.kind in SPECTRUM_KINDS
    assert spectrum.flux.dtype == np.float32 and spectrum.flux.shape == (N_PIXELS,)
    # the ivar keeps a float64 message's dtype (the error is computed in it, as the pipeline does)
    assert spectrum.ivar.dtype in (np.float32, np.float64) and spectrum.ivar.shape == (N_PIXELS,)
    assert np.isfinite(spectrum.flux).any()
    assert spectrum.source_id is None or isinstance(spectrum.source_id, str)
    assert spectrum.telescope is None or isinstance(spectrum.telescope, str)
    assert spectrum.visit is None or (isinstance(spectrum.visit, int) and not isinstance(spectrum.visit, bool))
    assert spectrum.mjd is None or (isinstance(spectrum.mjd, (int, float)) and not isinstance(spectrum.mjd, bool))
    return spectrum


# --------------------------------------------------------------------------------------------
# strategies

SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | SAFE_TEXT
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4),
                    max_leaves=12)
INTERESTING = st.sampled_from([
    1, 2, 0, -1, 8575, 8574, "inline", "reference", "coadd", "visit", "<f4", "<f8", ">f4", "ivar", "error", "",
    "/", "..", True, 1.0, 3, 10**20,
])
FIELD_VALUES = INTERESTING | JSON
INLINE_FIELDS = ("schema_version", "kind", "spectrum_id", "source_id", "telescope", "spectrum_kind", "visit", "mjd",
                 "n_pixels", "dtype", "uncertainty")
REFERENCE_FIELDS = ("schema_version", "kind", "spectrum_id", "path", "which", "source_id", "telescope", "mjd")

FLUX, IVAR = synthetic_spectra(1, seed=5)
GOOD_PAYLOAD = {dtype: FLUX[0].astype(dtype).tobytes() + IVAR[0].astype(dtype).tobytes() for dtype in DTYPES}


def inline_header(**changes) -> dict:
    return {"schema_version": 1, "kind": "inline", "spectrum_id": "fuzz", "source_id": "2M0", "telescope": "apo25m",
            "spectrum_kind": "coadd", "visit": None, "mjd": None, "n_pixels": N_PIXELS, "dtype": "<f4",
            "uncertainty": "ivar", **changes}


def reference_header(path: str, which="coadd") -> dict:
    return {"schema_version": 1, "kind": "reference", "spectrum_id": "fuzz-ref", "path": path, "which": which}


@st.composite
def fuzzed_headers(draw, root_path: str):
    """A good header (either kind) with a few fields replaced, dropped or added."""
    if draw(st.booleans()):
        header, fields = inline_header(), INLINE_FIELDS
        header["dtype"] = draw(st.sampled_from(DTYPES))
    else:
        which = draw(st.sampled_from(["coadd", 1, 2, 3, 4]))
        header, fields = reference_header(f"{root_path}/dir/giant.fits", which), REFERENCE_FIELDS
    for name in draw(st.sets(st.sampled_from(fields), max_size=3)):
        header[name] = draw(FIELD_VALUES)
    for name in draw(st.sets(st.sampled_from(fields), max_size=2)):
        header.pop(name, None)
    header.update(draw(st.dictionaries(SAFE_TEXT.filter(lambda k: k not in INLINE_FIELDS + REFERENCE_FIELDS),
                                       JSON, max_size=2)))
    return header


def payloads(header) -> st.SearchStrategy[bytes]:
    good = GOOD_PAYLOAD.get(header.get("dtype") if isinstance(header.get("dtype"), str) else None, b"")
    return st.sampled_from([good, b"", GOOD_PAYLOAD["<f4"], GOOD_PAYLOAD["<f8"]]) | st.binary(max_size=64)


# values equal to 1 (1, 1.0, true) are left to test_messages.py, which pins which of them is version 1
UNKNOWN_VERSIONS = JSON.filter(lambda v: v != 1)

PATH_PARTS = st.sampled_from(["..", ".", "", "dir", "giant.fits", "dwarf.fits", "notes.fits", "empty.fits",
                              "link-out.fits", "link-in.fits", "loop", "missing.fits", "root", "outside.fits"])


def paths(root_path: str) -> st.SearchStrategy[str]:
    parts = st.lists(PATH_PARTS | st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=12),
                     min_size=0, max_size=5)
    prefixes = st.sampled_from([root_path, root_path + "/", os.path.dirname(root_path), "/", "", "~", "$HOME"])
    return st.builds(lambda prefix, rest: "/".join([prefix, *rest]) if rest else prefix, prefixes, parts)


@st.composite
def fuzzed_messages(draw, root_path: str) -> bytes:
    """Every kind of damage below, for mixing into batches."""
    kind = draw(st.sampled_from(["bytes", "json", "header", "cut", "extended", "version", "path"]))
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "json":
        return frame(json.dumps(draw(JSON)).encode(), draw(st.binary(max_size=16)))
    if kind == "version":
        return frame(inline_header(schema_version=draw(UNKNOWN_VERSIONS)), GOOD_PAYLOAD["<f4"])
    if kind == "path":
        return frame(reference_header(draw(paths(root_path))))
    header = draw(fuzzed_headers(root_path))
    value = frame(header, draw(payloads(header)))
    if kind == "cut":
        return value[: draw(st.integers(0, max(len(value) - 1, 0)))]
    if kind == "extended":
        return value + draw(st.binary(min_size=1, max_size=16))
    return value


# --------------------------------------------------------------------------------------------
# decode: a validated spectrum or a documented reason


@FUZZ
@given(value=st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: b"APSP" + b))
def test_random_bytes(pipeline, value):
    assert outcome(pipeline, value) == "decode_error"


@FUZZ
@given(header=JSON, payload=st.binary(max_size=64) | st.sampled_from(list(GOOD_PAYLOAD.values())))
def test_valid_prefix_random_json_header(pipeline, header, payload):
    result = outcome(pipeline, frame(json.dumps(header).encode(), payload))
    if not isinstance(header, dict):
        assert result == "decode_error"
    elif header.get("schema_version") != 1:
        assert result == "schema_version"


@FUZZ
@given(data=st.data())
def test_fuzzed_headers(pipeline, root, data):
    header = data.draw(fuzzed_headers(str(root)))
    outcome(pipeline, frame(header, data.draw(payloads(header))))


@FUZZ
@given(dtype=st.sampled_from(DTYPES), reference=st.booleans(), data=st.data())
def test_truncated_and_extended_messages(pipeline, root, dtype, reference, data):
    value = (frame(reference_header(f"{root}/dwarf.fits")) if reference
             else frame(inline_header(dtype=dtype), GOOD_PAYLOAD[dtype]))
    header_end = 8 + struct.unpack_from("<I", value, 4)[0]
    assert isinstance(outcome(pipeline, value), Spectrum)
    cut = data.draw(st.integers(0, len(value) - 1), label="cut")
    assert outcome(pipeline, value[:cut]) == ("decode_error" if cut < header_end else "wrong_shape")
    extra = data.draw(st.binary(min_size=1, max_size=64), label="extra")
    assert outcome(pipeline, value + extra) == ("decode_error" if reference else "wrong_shape")


@FUZZ
@given(
    dtype=st.sampled_from([*DTYPES, ">f4", ">f8", "<f2", "<i4", "|u1", "float32", "f4", "<c8", "<f16"]) | JSON,
    n_pixels=st.sampled_from([N_PIXELS, N_PIXELS - 1, N_PIXELS + 1, 0, 1, -1, 2 * N_PIXELS]) | JSON,
    size=st.sampled_from(["match", "short", "long", "empty", "other"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_wrong_dtypes_and_shapes(pipeline, dtype, n_pixels, size, seed):
    """The exact reason, in the decoder's documented order: dtype, n_pixels, payload size, grid."""
    dtype_ok = isinstance(dtype, str) and dtype in DTYPES
    count_ok = isinstance(n_pixels, int) and not isinstance(n_pixels, bool)
    itemsize = np.dtype(dtype).itemsize if dtype_ok else 4
    expected_bytes = 2 * n_pixels * itemsize if count_ok and 0 <= n_pixels <= 4 * N_PIXELS else 64
    length = {"match": expected_bytes, "short": expected_bytes - 1, "long": expected_bytes + itemsize, "empty": 0,
              "other": 7}[size]
    payload = np.random.default_rng(seed).uniform(1, 2, max(length, 0) // 8 + 1).tobytes()[: max(length, 0)]
    result = outcome(pipeline, frame(inline_header(dtype=dtype, n_pixels=n_pixels), payload))
    if not dtype_ok:
        assert result == "wrong_dtype"
    elif not count_ok:
        assert result == "invalid_field"
    elif n_pixels < 0 or len(payload) != 2 * n_pixels * itemsize or n_pixels != N_PIXELS:
        assert result == "wrong_shape"
    else:
        assert isinstance(result, Spectrum)


SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, -1e30, 1e-45, 1e-38, 1e30, 3.4e38, -3.4e38,
                           1e300, -1e300, 5e-324])


@st.composite
def damaged_arrays(draw):
    """Good flux and ivar with special values poured over random stretches (or everywhere)."""
    flux, ivar = FLUX[0].astype(np.float64), IVAR[0].astype(np.float64)
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from([flux, ivar]))
        start = draw(st.integers(0, N_PIXELS - 1))
        stop = draw(st.sampled_from([start + 1, start + 50, N_PIXELS])) if draw(st.booleans()) else N_PIXELS
        if draw(st.booleans()):
            start = 0
        target[start:stop] = draw(SPECIAL)
    return flux, ivar


@FUZZ
@given(arrays=damaged_arrays(), dtype=st.sampled_from(DTYPES), uncertainty=st.sampled_from(["ivar", "error"]))
def test_special_values_in_the_arrays(pipeline, arrays, dtype, uncertainty):
    flux, second = arrays
    value = frame(inline_header(dtype=dtype, uncertainty=uncertainty), flux.astype(dtype).tobytes()
                  + second.astype(dtype).tobytes())
    result = outcome(pipeline, value)
    if np.isfinite(flux.astype(dtype).astype(np.float32)).any():
        assert isinstance(result, Spectrum)
        assert not (result.ivar < 0).any() or uncertainty == "ivar"  # error → ivar is never negative
    else:
        assert result == "all_nan_flux"


@FUZZ
@given(version=UNKNOWN_VERSIONS | st.just("absent"))
def test_unknown_schema_versions(pipeline, version):
    header = inline_header(schema_version=version)
    if version == "absent":
        del header["schema_version"]
    assert outcome(pipeline, frame(header, GOOD_PAYLOAD["<f4"])) == "schema_version"


@FUZZ
@given(data=st.data(), which=st.sampled_from(["coadd", 1, 2]))
def test_random_file_paths(pipeline, root, data, which):
    path = data.draw(paths(str(root)), label="path")
    result = outcome(pipeline, frame(reference_header(path, which)))
    real = os.path.realpath(path)
    root_real = os.path.realpath(root)
    if os.path.commonpath([real, root_real]) != root_real:
        assert result == "path_not_allowed"
    elif not os.path.exists(real):
        assert result == "missing_file"
    elif not os.path.isfile(real) or real.endswith(("notes.fits", "empty.fits")):
        assert result == "not_apstar"
    elif real.endswith("dwarf.fits") and which == 2:
        assert result == "no_such_visit"  # a single-visit file
    else:
        assert isinstance(result, Spectrum)
        assert result.origin == real


# --------------------------------------------------------------------------------------------
# run: one outgoing message per input, results for the good ones, standard JSON only


def strict_json(data: bytes):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in a result")

    def check(value):
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)

    parsed = json.loads(data, parse_constant=refuse)
    check(parsed)
    return parsed


def check_batch(pipeline, values: list[bytes | None], good: set[int]) -> dict[int, dict]:
    """Runs one batch; returns the records by input offset."""
    messages = [consumed(value, offset=i, key=f"key{i}".encode()) for i, value in enumerate(values)]
    batch = pipeline.run(messages)
    assert len(batch.outgoing) == len(messages)
    records, letters = {}, {}
    for out in batch.outgoing:
        if out.topic == OUTPUT:
            record = strict_json(out.value)
            RESULT_SCHEMA.validate(record)
            assert out.key == record["spectrum_id"].encode()
            records[record["input_offset"]] = record
        else:
            assert out.topic == DEAD
            meta = {k: v.decode() for k, v in out.headers if k.startswith("dlq.")}
            DLQ_SCHEMA.validate(meta)
            offset = int(meta["dlq.source.offset"])
            assert out.key == messages[offset].key and out.value == (messages[offset].value or b"")
            letters[offset] = meta["dlq.reason"]
    assert sorted([*records, *letters]) == list(range(len(messages)))  # exactly one each
    assert good <= set(records)
    assert len(batch.records) == len(records) and len(batch.dead_letters) == len(letters)
    return records


GOOD_FLUX, GOOD_IVAR = synthetic_spectra(2, seed=8)
GOOD_INLINE = [encode_inline(Spectrum(f"good{i}", GOOD_FLUX[i], GOOD_IVAR[i])) for i in range(2)]


def good_values(root) -> list[bytes]:
    """Two inline spectra and a reference to a real file."""
    return [*GOOD_INLINE, encode_reference(f"{root}/dwarf.fits", 1, spectrum_id="good-ref")]


@FUZZ_BATCH
@given(data=st.data())
def test_batches_mixing_fuzzed_and_good_messages(pipeline, root, data):
    fuzzed = data.draw(st.lists(fuzzed_messages(str(root)) | st.none(), min_size=1, max_size=6), label="fuzzed")
    good = good_values(root)
    values = [*fuzzed, *good]
    order = data.draw(st.permutations(range(len(values))), label="order")
    values = [values[i] for i in order]
    good_offsets = {order.index(len(fuzzed) + j) for j in range(len(good))}
    records = check_batch(pipeline, values, good_offsets)
    for offset in good_offsets:
        assert records[offset]["teff"] is not None


@FUZZ_BATCH
@given(arrays=st.lists(damaged_arrays(), min_size=1, max_size=4), dtype=st.sampled_from(DTYPES))
def test_batches_with_special_values_give_finite_or_null_numbers(pipeline, root, arrays, dtype):
    values = [frame(inline_header(spectrum_id=f"d{i}", dtype=dtype), f.astype(dtype).tobytes()
                    + s.astype(dtype).tobytes()) for i, (f, s) in enumerate(arrays)]
    records = check_batch(pipeline, [*values, GOOD_INLINE[0]], {len(values)})
    for record in records.values():
        if record["teff"] is None:
            assert record["result_flags"] == 1 and record["error_message"]


# --------------------------------------------------------------------------------------------
# memory


def _memory_corpus(root, count: int) -> list[bytes]:
    rng = np.random.default_rng(2024)
    good = frame(inline_header(), GOOD_PAYLOAD["<f4"])
    makers = [
        lambda: rng.bytes(int(rng.integers(0, 200))),
        lambda: b"APSP" + rng.bytes(int(rng.integers(0, 200))),
        lambda: good,
        lambda: frame(inline_header(dtype="<f8"), GOOD_PAYLOAD["<f8"]),
        lambda: good[: int(rng.integers(0, len(good)))],
        lambda: good + rng.bytes(3),
        lambda: frame(inline_header(spectrum_id=f"id{rng.integers(1 << 60)}", mjd=float(rng.normal())),
                      GOOD_PAYLOAD["<f4"]),
        lambda: frame(inline_header(schema_version=int(rng.integers(2, 100)))),
        lambda: frame(inline_header(dtype=">f4"), GOOD_PAYLOAD["<f4"]),
        lambda: frame(b"[" * int(rng.integers(1, 5000))),
        lambda: frame(reference_header(f"{root}/missing{rng.integers(1000)}.fits")),
        lambda: frame(reference_header(f"{root}/../outside.fits")),
        lambda: frame(reference_header(f"{root}/notes.fits")),
        lambda: frame(reference_header(f"{root}/dir")),
    ]
    values = [makers[int(rng.integers(len(makers)))]() for _ in range(count)]
    for i in range(0, count, 100):  # a few real file reads, too
        values[i] = frame(reference_header(f"{root}/dwarf.fits", "coadd"))
    return values


def test_decoding_does_not_accumulate_memory(pipeline, root):
    corpus = _memory_corpus(root, 2_000)
    for value in corpus[:200]:  # warm up caches (numpy, astropy, json, warnings registry)
        outcome(pipeline, value)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        reasons: dict[str, int] = {}
        for value in corpus:
            result = outcome(pipeline, value)
            key = "ok" if isinstance(result, Spectrum) else result
            reasons[key] = reasons.get(key, 0) + 1
            del result
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(reasons) >= 6, reasons  # the corpus exercised many paths
    # one leaked spectrum would be 70 kB; 2000 inputs leaking anything would show up in megabytes
    assert growth < 256 * 1024, [str(s) for s in after.compare_to(before, "lineno")[:10]]


# --------------------------------------------------------------------------------------------
# regressions: crashes and wrong reasons that fuzzing found (fixed)


def _with_raw_header(text: bytes, payload: bytes = GOOD_PAYLOAD["<f4"]) -> bytes:
    return b"APSP" + struct.pack("<I", len(text)) + text + payload


NON_FINITE_MJD = [
    pytest.param(_with_raw_header(json.dumps(inline_header()).replace('"mjd": null', '"mjd": 1e400').encode()),
                 id="inline-mjd-1e400"),
    pytest.param(_with_raw_header(json.dumps(inline_header()).replace('"mjd": null', '"mjd": NaN').encode()),
                 id="inline-mjd-NaN"),
    pytest.param(_with_raw_header(json.dumps(inline_header()).replace('"mjd": null', '"mjd": -Infinity').encode()),
                 id="inline-mjd-minus-Infinity"),
]


@pytest.mark.parametrize("value", NON_FINITE_MJD)
def test_non_finite_mjd_does_not_break_the_batch(pipeline, root, value):
    check_batch(pipeline, [value, *good_values(root)], {1, 2, 3})


def test_non_finite_reference_mjd_does_not_break_the_batch(pipeline, root):
    text = json.dumps({**reference_header(f"{root}/dwarf.fits"), "mjd": None}).replace('"mjd": null', '"mjd": NaN')
    check_batch(pipeline, [_with_raw_header(text.encode(), b""), *good_values(root)], {1, 2, 3})


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\udc80b"])
def test_lone_surrogate_spectrum_id_does_not_break_the_batch(pipeline, root, escape):
    text = json.dumps(inline_header(spectrum_id="PLACEHOLDER")).replace("PLACEHOLDER", escape).encode()
    check_batch(pipeline, [_with_raw_header(text), *good_values(root)], {1, 2, 3})


@pytest.mark.parametrize("where", ["outside", "missing-inside"])
def test_surrogate_escaped_path_does_not_break_the_batch(pipeline, root, where):
    path = "/etc/PLACE" if where == "outside" else f"{root}/PLACE.fits"
    text = json.dumps(reference_header(path)).replace("PLACE", "\\udc80").encode()
    check_batch(pipeline, [_with_raw_header(text, b""), *good_values(root)], {1, 2, 3})


@pytest.mark.parametrize(
    "path",
    ["{root}/a\x00b.fits", "/etc/\x00", "{root}/" + "a" * 300 + ".fits", "{root}/" + "a/" * 3000, "{root}/\ud800"],
    ids=["nul-inside", "nul-outside", "long-component", "long-path", "lone-surrogate"],
)
def test_unusable_paths_have_a_documented_reason(pipeline, root, path):
    value = frame(reference_header(path.format(root=root)))
    try:
        pipeline.decode(consumed(value))
    except InputError as exc:
        assert exc.reason in REASONS - {"internal_error"}
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}") from None
    else:
        raise AssertionError("decoded")


@pytest.mark.parametrize("fill", ["negative", "negative-and-zero"])
def test_ivar_without_positive_pixels_means_no_information(pipeline, fill):
    ivar = np.full(N_PIXELS, -1.0, "<f4")
    if fill == "negative-and-zero":
        ivar[::2] = 0.0
    values = [frame(inline_header(spectrum_id="zero"), FLUX[0].tobytes() + np.zeros(N_PIXELS, "<f4").tobytes()),
              frame(inline_header(spectrum_id="negative"), FLUX[0].tobytes() + ivar.tobytes())]
    records = check_batch(pipeline, values, {0, 1})
    assert records[0]["result_flags"] & 1 == 0  # all-zero ivar: the fallback works
    assert records[1]["result_flags"] & 1 == 0, records[1]["error_message"]
