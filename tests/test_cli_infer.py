import csv
import json

import numpy as np
import pytest
import torch
from astropy.table import Table

from stream_worker.cli import main
from stream_worker.core.estimate import SCIENCE_FIELDS
from stream_worker.engine.weights import DEMO_MODEL_NAME
from tests.helpers import DWARF_FILE, GIANT_FILE, small_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "small.pt"
    torch.save(small_model().state_dict(), path)
    return path


def run(*args):
    return main(["infer", str(GIANT_FILE), str(DWARF_FILE), *map(str, args)])


def test_jsonl_has_one_row_per_spectrum(tmp_path, weights):
    out = tmp_path / "r.jsonl"
    assert run("--visits", "--weights", weights, "--draws", "3", "-o", out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["spectrum_id"].split(":")[1] for r in rows] == ["coadd", "visit1", "visit2", "visit3", "coadd", "visit1"]
    for row in rows:
        assert set(SCIENCE_FIELDS) <= set(row)
        assert row["teff"] > 0 and row["e_teff"] > 10 and row["spectrum_kind"] in ("coadd", "visit")
        assert row["model_name"] == "small.pt"


def test_csv_and_fits(tmp_path, weights):
    assert run("--weights", weights, "--draws", "0", "-o", tmp_path / "r.csv") == 0
    with (tmp_path / "r.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 and rows[0]["e_teff"] == ""  # no draws, no uncertainties
    assert run("--weights", weights, "--draws", "2", "-o", tmp_path / "r.fits") == 0
    table = Table.read(tmp_path / "r.fits")
    assert len(table) == 2 and np.all(table["teff"] > 0) and table["result_flags"].dtype.kind == "i"


def test_random_weights_never_run_silently(tmp_path, capsys):
    """No weights configured: the shipped demonstration model runs, the log says so and every
    record names it; an untrained network runs only on explicit request."""
    out = tmp_path / "r.jsonl"
    assert run("--draws", "2", "-o", out) == 0
    assert "DEMONSTRATION model" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["model_name"] == DEMO_MODEL_NAME and r["model_trained"] is True for r in rows)
    assert run("--allow-random-weights", "--draws", "0", "-o", out) == 0
    assert "UNTRAINED network" in capsys.readouterr().err
    assert all(json.loads(line)["model_trained"] is False for line in out.read_text().splitlines())


def test_unreadable_file_is_reported_and_the_rest_processed(tmp_path, weights, capsys):
    out = tmp_path / "r.jsonl"
    code = main(["infer", str(tmp_path / "missing.fits"), str(DWARF_FILE), "--weights", str(weights),
                 "--draws", "0", "-o", str(out)])
    assert code == 1
    assert "missing_file" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1


def test_unknown_output_format(tmp_path, weights):
    assert run("--weights", weights, "--draws", "0", "-o", tmp_path / "r.xlsx") == 2


def test_every_format_writes_the_same_records(tmp_path, weights):
    """One record builder, four serializers: the same rows whichever format (``--format`` or the
    suffix), with the provenance of the engine's plan, as the stream publishes them."""
    out = {fmt: tmp_path / f"r.{fmt}" for fmt in ("jsonl", "json", "csv", "fits")}
    for path in out.values():
        assert run("--weights", weights, "--draws", "2", "-o", path) == 0
    assert run("--weights", weights, "--draws", "2", "--format", "json", "-o", tmp_path / "array.txt") == 0
    lines = [json.loads(line) for line in out["jsonl"].read_text().splitlines()]
    array = json.loads(out["json"].read_text())
    assert json.loads((tmp_path / "array.txt").read_text())[0]["teff"] == lines[0]["teff"]
    with out["csv"].open() as stream:
        rows = list(csv.DictReader(stream))
    table = Table.read(out["fits"])
    assert len(lines) == len(array) == len(rows) == len(table) == 2
    for i, record in enumerate(lines):
        assert record["schema_version"] == 2 and record["engine_plan"].startswith("exact/cpu")
        assert array[i]["teff"] == record["teff"] and float(rows[i]["teff"]) == record["teff"]
        assert table["teff"][i] == record["teff"] and table["engine_plan"][i] == record["engine_plan"]
        assert set(rows[i]) == set(record) == set(table.colnames)


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"stream-worker {version('stream-worker')}"
