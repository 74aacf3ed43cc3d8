"""The output formats' registry: one name per format, shared by ``run`` and ``infer``."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from stream_worker.io.serializers import FORMATS, for_path, message_formats, serializer, write_records

RECORD = {"spectrum_id": "s", "teff": 4000.5, "e_teff": None, "result_flags": 0, "flag_bad": False}


def test_every_format_is_found_by_name_and_by_suffix():
    for name in FORMATS:
        chosen = serializer(name)
        assert chosen.name == name
        for suffix in chosen.suffixes:
            assert for_path(Path(f"out{suffix.upper()}")) is chosen
    assert message_formats() == ["json", "jsonl", "avro"]


def test_unknown_formats_name_the_known_ones():
    with pytest.raises(ValueError, match="unknown output format 'xml': choose one of json, jsonl, csv, fits, avro"):
        serializer("xml")
    with pytest.raises(ValueError, match=r"unknown output format '\.xlsx'"):
        for_path(Path("r.xlsx"))


def test_json_message_is_compact_and_never_nan():
    encode = serializer("json").encode
    assert encode(RECORD) == b'{"spectrum_id":"s","teff":4000.5,"e_teff":null,"result_flags":0,"flag_bad":false}'
    with pytest.raises(ValueError):
        encode({**RECORD, "teff": math.nan})
    assert serializer("json").content_type == "application/vnd.apogee.result+json; version=2"
    assert serializer("csv").encode is None and serializer("fits").encode is None


def test_jsonl_to_stdout_by_default(capsysbinary):
    write_records([RECORD, {**RECORD, "spectrum_id": "t"}], None)
    lines = capsysbinary.readouterr().out.splitlines()
    assert [json.loads(line)["spectrum_id"] for line in lines] == ["s", "t"]


def test_csv_leaves_missing_values_empty():
    stream = io.BytesIO()
    serializer("csv").write([RECORD], stream)
    assert stream.getvalue().decode().splitlines() == ["spectrum_id,teff,e_teff,result_flags,flag_bad",
                                                       "s,4000.5,,0,False"]


def test_the_wire_format_needs_no_torch():
    """A producer encodes and decodes messages with the wire-format module alone: no torch."""
    code = (
        "import sys, numpy as np\n"
        "from stream_worker.io.wire import decode_input, encode_inline\n"
        "from stream_worker.core.spectrum import Spectrum\n"
        "value = encode_inline(Spectrum('s', np.ones(8575, np.float32), np.ones(8575, np.float32)))\n"
        "assert decode_input(value).spectrum_id == 's'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
