import hashlib
import os
import re

import pytest
import torch

from stream_worker.engine.network import ApogeeNet, ModelSizes
from stream_worker.engine.weights import (
    DEMO_MODEL_NAME,
    WeightsError,
    check_state_dict,
    infer_sizes,
    load_model,
)
from tests.helpers import DATA, SMALL_SIZES, small_model


def reference_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (DATA / "apogeenet_state_dict.txt").read_text().splitlines():
        name, shape, _dtype = re.match(r"^(\S+) \(([^)]*)\) (\S+)$", line).groups()
        keys[name] = tuple(int(d) for d in shape.split(",") if d.strip())
    return keys


@pytest.fixture(scope="module")
def full_model():
    return ApogeeNet()


def test_state_dict_matches_official_keys_and_shapes(full_model):
    expected = reference_keys()
    found = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    assert len(expected) == 70
    assert found == expected


def test_official_parameter_count(full_model):
    assert sum(p.numel() for p in full_model.parameters()) == 72_606_495


def test_official_output_shape_and_lengths(full_model):
    with torch.inference_mode():
        assert full_model(torch.zeros(2, 1, 8575)).shape == (2, 3)


def test_sizes_are_constructor_arguments():
    model = ApogeeNet(channels=(2, 3, 5), pooled_length=8, linear_width=16, linear_layers=1)
    assert model.res_blocks[1].conv2.weight.shape == (5, 5, 30)
    assert model.linear_sequential[0].linear_layer.weight.shape == (16, 5 * 8)
    assert len(model.linear_sequential) == 2
    with torch.inference_mode():
        assert model(torch.zeros(3, 1, 8575)).shape == (3, 3)


def test_odd_channel_growth_pads_shortcut_both_sides():
    block = ApogeeNet(channels=(4, 7)).res_blocks[0]
    assert block.shortcut_padding == (0, 0, 1, 2)


def test_infer_sizes_roundtrip():
    model = ApogeeNet(**SMALL_SIZES)
    assert infer_sizes(model.state_dict()) == ModelSizes(**{**SMALL_SIZES, "channels": (4, 8)})
    headless = ApogeeNet(channels=(1, 1), kernel_size=2, pooled_length=3, linear_layers=0)
    assert ApogeeNet(**vars(infer_sizes(headless.state_dict()))).state_dict().keys() == headless.state_dict().keys()


def save(state_dict, path):
    torch.save(state_dict, path)
    return path


def test_load_single_file_gives_identical_outputs(tmp_path):
    model = small_model(seed=3)
    path = save(model.state_dict(), tmp_path / "weights.pt")
    loaded = load_model(path, device="cpu")
    x = torch.randn(2, 1, 8575)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert loaded.weights_info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_chunked_directory_in_numeric_order(tmp_path):
    model = small_model(seed=4)
    raw = save(model.state_dict(), tmp_path / "w.pt").read_bytes()
    chunks = tmp_path / "deconstructed_model"
    chunks.mkdir()
    size = len(raw) // 12 + 1
    for i in range(12):  # 12 chunks: lexical order would put 10 and 11 before 2
        (chunks / f"model_chunk_{i}").write_bytes(raw[i * size : (i + 1) * size])
    loaded = load_model(chunks, device="cpu")
    assert loaded.weights_info.sha256 == hashlib.sha256(raw).hexdigest()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_chunk_gap_is_an_error(tmp_path):
    (tmp_path / "model_chunk_0").write_bytes(b"a")
    (tmp_path / "model_chunk_2").write_bytes(b"b")
    with pytest.raises(WeightsError, match=r"without gaps: found \[0, 2\]"):
        load_model(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = small_model().state_dict()
    del state["first_conv.bn.running_var"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        check_state_dict(small_model(), state)
    assert "missing keys: first_conv.bn.running_var" in str(info.value)
    assert "unexpected keys: extra.weight" in str(info.value)


def test_wrong_shape_is_named(tmp_path):
    state = small_model().state_dict()
    state["first_conv.bn.weight"] = torch.zeros(5)
    with pytest.raises(WeightsError, match=r"first_conv.bn.weight: expected \(4,\), found \(5,\)"):
        load_model(save(state, tmp_path / "w.pt"), sizes=ModelSizes(**{**SMALL_SIZES, "channels": (4, 8)}))


def test_sha256_pin(tmp_path):
    path = save(small_model().state_dict(), tmp_path / "w.pt")
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_model(path, sha256=good.upper()).weights_info.sha256 == good
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_model(path, sha256="0" * 64)


def test_environment_variables_expand(tmp_path, monkeypatch):
    save(small_model().state_dict(), tmp_path / "w.pt")
    monkeypatch.setenv("MWM_ASTRA", str(tmp_path))
    assert load_model("$MWM_ASTRA/w.pt").weights_info.source == str(tmp_path / "w.pt")
    monkeypatch.delenv("MWM_ASTRA")
    with pytest.raises(WeightsError, match="unset environment variable"):
        load_model("$MWM_ASTRA/w.pt")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model(tmp_path / "bad.pt")


class Sneaky:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a file that would execute code on load is rejected."""
    torch.save({"x": Sneaky()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model(tmp_path / "evil.pt")


def test_no_path_loads_the_demo_model():
    """No path loads the shipped demonstration model (trained, named as
    such, checksum verified against its metadata), never an untrained network."""
    model = load_model(None, device="cpu")
    assert model.weights_info.name == DEMO_MODEL_NAME and model.weights_info.trained
    assert not model.training
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_model(None, sha256="0" * 64)  # a pin applies to the demo model too


def test_the_demo_models_card_comes_from_its_metadata():
    from stream_worker.core.labels import APOGEENET_III

    assert load_model(None, device="cpu").weights_info.card == APOGEENET_III  # its JSON records the same
    assert small_model().weights_info.card == APOGEENET_III


def test_label_order_normalisation_and_calibration_travel_with_the_weights(tmp_path):
    """A second model brings its own output order, normalisation and calibration in the JSON
    beside its weights; the engine reads them from there."""
    import json

    import numpy as np

    from stream_worker.core.labels import APOGEENET_III
    from stream_worker.engine.estimator import Estimator
    from tests.helpers import synthetic_spectra

    model = small_model()
    torch.save(model.state_dict(), tmp_path / "same.pt")
    torch.save(model.state_dict(), tmp_path / "other.pt")
    # the same network described with its outputs permuted: the physical values must not change
    card = {"targets": {"order": ["fe_h", "logg", "log10_teff"],
                        "normalisation": {"logg": [3.2, 1.2], "log10_teff": [3.7, 0.1], "fe_h": [-0.2, 0.3]}},
            "calibration": {"teff": [2.0, 0.0], "logg": [1.25, 0.01], "fe_h": [1.0, 0.01]}}
    (tmp_path / "other.json").write_text(json.dumps(card))
    other = load_model(tmp_path / "other.pt")
    assert other.weights_info.card.outputs == ("fe_h", "logg", "log10_teff")
    assert load_model(tmp_path / "same.pt").weights_info.card == APOGEENET_III
    flux, ivar = synthetic_spectra(1)
    same_estimate = Estimator(load_model(tmp_path / "same.pt"), num_draws=4).estimate(flux, ivar, ["x"])[0]
    other_estimate = Estimator(other, num_draws=4).estimate(flux, ivar, ["x"])[0]
    assert other_estimate.e_teff == 2.0 * other_estimate.raw_e_teff
    # outputs re-labelled: column 0 is now read as [Fe/H], so the values move, by the card's rule
    assert other_estimate.fe_h == pytest.approx(same_estimate.logg * 0.3 / 1.2 + (-0.2 - 3.2 * 0.3 / 1.2), rel=1e-5)
    assert np.isfinite(other_estimate.teff)


@pytest.mark.parametrize("metadata, message", [
    ('{"sha256": "' + "0" * 64 + '"}', "describes other weights"),
    ('{"targets": {"order": ["logg", "teff", "fe_h"]}}', "targets.order: expected a permutation"),
    ('{"calibration": {"teff": [1.25]}}', "calibration: expected entries for"),
    ('{"targets": {"normalisation": {"logg": [3.2, 0], "log10_teff": [3.7, 0.1], "fe_h": [-0.2, 0.3]}}}', "scale of 0"),
    ("not json", "cannot read the model metadata"),
])
def test_bad_model_metadata_is_refused_with_the_field_named(tmp_path, metadata, message):
    torch.save(small_model().state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(metadata)
    with pytest.raises(WeightsError, match=message):
        load_model(tmp_path / "w.pt")
