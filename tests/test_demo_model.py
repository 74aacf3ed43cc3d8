"""The shipped demonstration model: it loads by default, matches its recorded checksum, and gives
physically sensible parameters for the real DR17 files."""

import hashlib
import json
import logging
import shutil
from importlib import resources

import numpy as np
import pytest

from stream_worker.config import EngineConfig
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.network import ModelSizes
from stream_worker.engine.weights import (
    DEMO_MODEL_FILE,
    DEMO_MODEL_NAME,
    WeightsError,
    infer_sizes,
    load_demo_model,
    load_model,
)
from stream_worker.io.apstar import read_apstar
from tests.helpers import DWARF_FILE, GIANT_FILE, records_of

MODELS = resources.files("stream_worker") / "models"


@pytest.fixture(scope="module")
def metadata():
    return json.loads((MODELS / "apogeenet-demo.json").read_text())


@pytest.fixture(scope="module")
def demo():
    return load_model(device="cpu")


def test_default_model_is_the_shipped_demo(demo, metadata):
    info = demo.weights_info
    assert info.name == DEMO_MODEL_NAME and info.trained
    assert info.sha256 == metadata["sha256"]
    assert info.sha256 == hashlib.sha256((MODELS / DEMO_MODEL_FILE).read_bytes()).hexdigest()
    assert not demo.training


def test_checkpoint_is_a_plain_state_dict_of_the_recorded_sizes(demo, metadata):
    import torch

    state = torch.load(MODELS / DEMO_MODEL_FILE, map_location="cpu", weights_only=True)
    assert infer_sizes(state) == ModelSizes(**{**metadata["sizes"], "channels": tuple(metadata["sizes"]["channels"])})
    assert sum(p.numel() for p in demo.parameters()) == metadata["parameters"]
    assert (MODELS / DEMO_MODEL_FILE).stat().st_size < 5_000_000
    # BatchNorm statistics were recomputed after training: finite, positive variances
    for key, value in state.items():
        if key.endswith("running_var"):
            assert torch.isfinite(value).all() and (value > 0).all(), key


def test_a_checkpoint_that_does_not_match_its_metadata_is_refused(tmp_path):
    for name in (DEMO_MODEL_FILE, "apogeenet-demo.json"):
        shutil.copyfile(MODELS / name, tmp_path / name)
    assert load_demo_model(directory=tmp_path).weights_info.name == DEMO_MODEL_NAME
    meta = json.loads((tmp_path / "apogeenet-demo.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "apogeenet-demo.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="corrupt or was replaced"):
        load_demo_model(directory=tmp_path)
    (tmp_path / "apogeenet-demo.json").unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_demo_model(directory=tmp_path)


def test_engine_without_weights_runs_the_demo_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        estimator = Estimator.from_config(EngineConfig(weights=None, device="cpu", num_draws=0))
    assert estimator.weights_info.name == DEMO_MODEL_NAME
    assert "DEMONSTRATION" in caplog.text
    random = Estimator.from_config(EngineConfig(weights=None, allow_random_weights=True, device="cpu", num_draws=0))
    assert not random.weights_info.trained  # random weights only on explicit request


@pytest.fixture(scope="module")
def real_records(demo):
    spectra = read_apstar(GIANT_FILE, visits=True) + read_apstar(DWARF_FILE, visits=True)
    estimator = Estimator(demo, num_draws=20, seed=0, device="cpu")  # as the pipeline and docs/accuracy.md
    records = records_of(
        estimator,
        np.stack([s.flux for s in spectra]), np.stack([s.ivar for s in spectra]), [s.spectrum_id for s in spectra]
    )
    return {s.spectrum_id.split("-", 2)[2]: r for s, r in zip(spectra, records)}


def test_real_k_dwarf_is_a_k_dwarf(real_records):
    for key in ("2M19485057+5005279:coadd", "2M19485057+5005279:visit1"):
        r = real_records[key]
        assert 4700 < r["teff"] < 5700, r
        assert r["logg"] > 4.2, r
        assert -0.8 < r["fe_h"] < 0.4, r
        assert r["flag_bad"] is False or r["flag_bad"] == 0, r


def test_real_cool_giant_is_a_cool_giant(real_records):
    """~3700 K, log g ~0.5 is outside the emulators' box (>= 3884 K, >= 1.24): the model can only
    place it at the cool, low-gravity edge of what it was trained on."""
    for which in ("coadd", "visit1", "visit2", "visit3"):
        r = real_records[f"2M17335483-2753043:{which}"]
        assert r["teff"] < 4300, r
        assert r["logg"] < 2.0, r
        assert -1.0 < r["fe_h"] < 0.5, r


def test_visits_of_one_star_agree_within_their_uncertainties(real_records):
    """The three visits scatter about their weighted mean as their reported uncertainties say:
    chi² (2 degrees of freedom) below its 95th percentile, 5.99, for every label."""
    visits = [real_records[f"2M17335483-2753043:visit{i}"] for i in (1, 2, 3)]
    for label in ("teff", "logg", "fe_h"):
        value = np.array([v[label] for v in visits])
        weight = np.array([v[f"e_{label}"] for v in visits]) ** -2.0
        mean = np.sum(weight * value) / np.sum(weight)
        assert np.sum(weight * (value - mean) ** 2) < 5.99, (label, value, weight**-0.5)


def test_train_command_writes_a_loadable_checkpoint_and_its_metadata(tmp_path):
    """``python -m devtools.training`` end to end at toy sizes, then a fine-tuning stage from it."""
    from devtools.training import main

    tiny = ["--n-train", "64", "--n-val", "16", "--epochs", "1", "--batch-size", "32", "--channels", "2,4",
            "--pooled-length", "8", "--linear-width", "16", "--linear-layers", "1"]
    first = tmp_path / "first.pt"
    assert main(["-o", str(first), *tiny]) == 0
    meta = json.loads(first.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert meta["sizes"]["channels"] == [2, 4] and meta["seed"] == 20260101
    assert set(meta["validation"]["overall"]) == {"teff", "logg", "fe_h"}
    model = load_model(first, sha256=meta["sha256"])
    assert not model.training and model.sizes.channels == (2, 4)
    second = tmp_path / "second.pt"
    assert main(["-o", str(second), *tiny, "--init-from", str(first), "--seed", "7"]) == 0
    meta2 = json.loads(second.with_suffix(".json").read_text())
    assert meta2["fine_tuned_from"]["sha256"] == meta["sha256"]
    assert meta2["fine_tuned_from"]["metadata"]["seed"] == 20260101


def test_accuracy_report_regenerates_without_the_shared_data(tmp_path):
    """``python -m devtools.accuracy`` at toy size on a clone without ../shared: the hold-out
    row is skipped with a note, everything else is written."""
    pytest.importorskip("matplotlib")
    from devtools.accuracy import main as accuracy

    assert accuracy(["--n", "4", "--draws", "2", "--out-dir", str(tmp_path), "--holdout", str(tmp_path / "absent.npz")]) == 0
    text = (tmp_path / "accuracy.md").read_text()
    assert "python -m devtools.accuracy --n 4 --draws 2" in text
    assert "Skipped:" in text and "2M17335483-2753043" in text and "| 200 (" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_fast_mode_keeps_the_uncertainties_of_exact_mode_on_trained_weights(demo):
    """Fast mode's rule: the same values, uncertainties within a median 5% of exact mode's on
    trained weights, whatever plan the measurement picks on this machine (on an AMX CPU, before
    reduced forms were checked at start-up, a bfloat16 convolution that computes wrong numbers
    at this model's shape moved them by a median 22% or more)."""
    spectra = read_apstar(GIANT_FILE, visits=True) + read_apstar(DWARF_FILE, visits=True)
    flux, ivar, ids = np.stack([s.flux for s in spectra]), [s.ivar for s in spectra], [s.spectrum_id for s in spectra]
    exact = Estimator(demo, num_draws=20, seed=0).estimate(flux, ivar, ids)
    fast = Estimator(demo, num_draws=20, seed=0, precision="fast").estimate(flux, ivar, ids)
    for name in ("teff", "logg", "fe_h"):
        assert [getattr(e, name) for e in fast] == [getattr(e, name) for e in exact]
        moved = np.median([abs(getattr(f, f"e_{name}") / getattr(e, f"e_{name}") - 1) for f, e in zip(fast, exact)])
        assert moved <= 0.05, (name, moved)
