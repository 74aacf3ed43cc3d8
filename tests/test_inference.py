import math

import numpy as np
import pytest
import torch

from devtools.sdss_reference import reference_estimate
from stream_worker.core.estimate import SCIENCE_FIELDS
from stream_worker.core.flags import ResultFlags
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.preprocess import noise_draws
from tests.helpers import Explodes, records_of, small_model, synthetic_spectra

RAW = ("teff", "logg", "fe_h", "raw_e_teff", "raw_e_logg", "raw_e_fe_h")


def assert_same_result(a: dict, b: dict) -> None:
    """Equal up to float32 rounding, for results of different code paths (the reference loop, the
    FFT and direct convolutions, an unfused module, another CPU's kernels): values to 1e-6
    relative; raw uncertainties (spreads of nearly equal float32 outputs) to 1e-4 relative or a few
    float32 ulps of the value, whichever is larger: one draw rounded one ulp differently moves a
    small spread by more than 1e-4 of itself (seen on AMD EPYC: 3e-4 K on a 1.8 K spread of 5018 K)."""
    for name in ("teff", "logg", "fe_h"):
        assert a[name] == pytest.approx(b[name], rel=1e-6), name
    for name in ("raw_e_teff", "raw_e_logg", "raw_e_fe_h"):
        ulps = 4 * float(np.spacing(np.float32(abs(b[name[len("raw_e_"):]]))))
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=ulps), name


@pytest.fixture(scope="module")
def spectra():
    return synthetic_spectra(5, seed=11)


@pytest.fixture(scope="module")
def records(tiny_model, spectra):
    flux, ivar = spectra
    return records_of(Estimator(tiny_model, num_draws=20, seed=5), flux, ivar, [f"s{i}" for i in range(5)])


def test_records_have_exactly_the_result_fields(records):
    for record in records:
        assert set(SCIENCE_FIELDS) <= set(record)
        assert record["result_flags"] == 0 or record["result_flags"] & ResultFlags.UNRELIABLE_FE_H
        assert record["model_name"] == "random-untrained" and record["model_trained"] is False
        assert record["weights_sha256"] and record["worker_version"]
        assert record["inference_seconds"] > 0 and record["error_message"] is None


def test_engine_matches_the_one_at_a_time_reference(tiny_model, spectra, records):
    flux, ivar = spectra
    for i, record in enumerate(records):
        with torch.no_grad():
            expected = reference_estimate(tiny_model, flux[i], ivar[i], noise_draws(f"s{i}", 5, 20, flux.shape[1]))
        assert_same_result(record, expected)


def test_engine_matches_the_reference_on_infinite_and_float64_ivar(tiny_model, spectra):
    """The two differences the sdss/astra audit found: ivar = +inf pixels (tiny error, not 5x the
    median) and float64 ivar (error arithmetic in float64, then float32)."""
    flux, ivar = spectra
    infinite = ivar[0].copy()
    infinite[1000:1100] = np.inf
    wide = ivar[1].astype(np.float64) * (1 + 1e-9 * np.arange(ivar.shape[1]))
    estimates = Estimator(tiny_model, num_draws=20, seed=5).estimate(flux[:2], [infinite, wide], ["inf", "wide"])
    for i, (row, estimate) in enumerate(zip([infinite, wide], estimates)):
        with torch.no_grad():
            expected = reference_estimate(tiny_model, flux[i], row, noise_draws(estimate.spectrum_id, 5, 20, flux.shape[1]))
        assert_same_result(vars(estimate), expected)


def test_a_float32_spectrum_gets_the_same_bits_beside_float64_ones(tiny_model, spectra):
    """Each spectrum's error is computed in its own ivar's dtype, never in a batch's common one."""
    flux, ivar = spectra
    engine = Estimator(tiny_model, num_draws=20, seed=5)
    alone = engine.estimate(flux[:1], ivar[:1], ["s0"])[0]
    mixed = engine.estimate(flux[:2], [ivar[0], ivar[1].astype(np.float64)], ["s0", "s1"])[0]
    assert vars(alone) | {"inference_seconds": 0} == vars(mixed) | {"inference_seconds": 0}


def test_full_size_network_matches_the_reference():
    from stream_worker.engine.weights import random_model

    model = random_model(device="cpu", seed=1)
    flux, ivar = synthetic_spectra(2, seed=2)
    records = records_of(Estimator(model, num_draws=4, seed=0), flux, ivar, ["a", "b"])
    for i, spectrum_id in enumerate(["a", "b"]):
        with torch.no_grad():
            expected = reference_estimate(model, flux[i], ivar[i], noise_draws(spectrum_id, 0, 4, flux.shape[1]))
        for name in RAW:
            assert records[i][name] == pytest.approx(expected[name], rel=1e-4), name


def test_calibrated_uncertainties_follow_the_noise_model(records):
    for r in records:
        assert r["e_teff"] == pytest.approx(1.25 * r["raw_e_teff"] + 10)
        assert r["e_logg"] == pytest.approx(1.25 * r["raw_e_logg"] + 0.01)
        assert r["e_fe_h"] == pytest.approx(r["raw_e_fe_h"] + 0.01)
        assert r["raw_e_teff"] > 0


def assert_identical(a: dict, b: dict) -> None:
    """The same record bit for bit (all but when and how fast), as de-duplicating re-deliveries requires."""
    def results(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("inference_seconds", "processed_at")}
    assert results(a) == results(b)


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("num_draws", [20, 0])
def test_result_does_not_depend_on_batch_companions(tiny_model, spectra, precision, num_draws):
    """Bit-identical whether a spectrum is alone, last in a batch, or among others split across
    forward passes of an odd number of rows: a re-delivered batch rarely has the same companions."""
    flux, ivar = spectra
    engine = Estimator(tiny_model, num_draws=num_draws, seed=5, precision=precision)
    together = records_of(engine, flux, ivar, [f"s{i}" for i in range(5)])
    alone = records_of(engine, flux[3:4], ivar[3:4], ["s3"])[0]
    other_flux, other_ivar = synthetic_spectra(7, seed=99)
    mixed_flux = np.concatenate([other_flux[:4], flux[3:4], other_flux[4:]])
    mixed_ivar = np.concatenate([other_ivar[:4], ivar[3:4], other_ivar[4:]])
    ids = [f"o{i}" for i in range(4)] + ["s3"] + [f"o{i}" for i in range(4, 7)]
    crowded = records_of(Estimator(tiny_model, num_draws=num_draws, seed=5, precision=precision, batch_size=13), 
        mixed_flux, mixed_ivar, ids)[4]
    assert_identical(alone, together[3])
    assert_identical(crowded, together[3])


def test_fast_mode_reports_the_exact_values_and_close_uncertainties(tiny_model, spectra):
    """Fast mode runs only the Monte Carlo draws in reduced precision: the reported parameters come
    from the clean pass through the exact network, bit for bit; only their spread moves, a little."""
    flux, ivar = spectra
    ids = [f"s{i}" for i in range(5)]
    exact = records_of(Estimator(tiny_model, num_draws=20, seed=5, kernels="rules"), flux, ivar, ids)
    engine = Estimator(tiny_model, num_draws=20, seed=5, precision="fast", kernels="rules")
    assert engine.draws_model is not engine.model
    fast = records_of(engine, flux, ivar, ids)
    moved = 0
    for a, b in zip(fast, exact):
        for name in ("teff", "logg", "fe_h", "result_flags"):
            assert a[name] == b[name]
        for name in ("raw_e_teff", "raw_e_logg", "raw_e_fe_h"):  # random weights: far more sensitive than trained
            assert a[name] == pytest.approx(b[name], rel=0.15)
            moved += a[name] != b[name]
    assert moved  # the draws did go through the bfloat16 network


def test_chunking_does_not_change_results(tiny_model, spectra, records):
    flux, ivar = spectra
    chunked = records_of(Estimator(tiny_model, num_draws=20, seed=5, chunk_spectra=2), 
        flux, ivar, [f"s{i}" for i in range(5)]
    )
    for a, b in zip(chunked, records):
        assert_identical(a, b)


@pytest.mark.parametrize("model", ["plain", "explodes"])
def test_chunks_queued_ahead_as_on_a_gpu_give_the_same_records_in_order(tiny_model, spectra, model):
    """On a GPU each chunk is summarised only after the next one is queued: no result may move,
    go missing or land on another spectrum, a failing spectrum's included."""
    flux, ivar = (a.copy() for a in spectra)
    flux[2, 400] = 1500.0  # what Explodes fails on
    network = tiny_model if model == "plain" else Explodes(tiny_model)
    ids = [f"s{i}" for i in range(5)]
    at_once = Estimator(network, num_draws=20, seed=5, chunk_spectra=2)
    ahead = Estimator(network, num_draws=20, seed=5, chunk_spectra=2)
    ahead.chunks_ahead = 1
    expected, got = records_of(at_once, flux, ivar, ids), records_of(ahead, flux, ivar, ids)
    assert [r["spectrum_id"] for r in got] == ids
    for a, b in zip(got, expected):
        assert_identical(a, b)
    assert (got[2]["result_flags"] == ResultFlags.RUNTIME_EXCEPTION) == (model == "explodes")


def test_same_spectrum_same_uncertainties_on_redelivery(tiny_model, spectra):
    flux, ivar = spectra
    first = records_of(Estimator(tiny_model, seed=5), flux[:1], ivar[:1], ["x"])[0]
    again = records_of(Estimator(tiny_model, seed=5), flux[:1], ivar[:1], ["x"])[0]
    renamed = records_of(Estimator(tiny_model, seed=5), flux[:1], ivar[:1], ["y"])[0]
    assert first["raw_e_teff"] == again["raw_e_teff"]
    assert first["raw_e_teff"] != renamed["raw_e_teff"]
    assert first["teff"] == renamed["teff"]  # the clean pass has no noise


def test_zero_draws_means_no_uncertainties(tiny_model, spectra):
    flux, ivar = spectra
    record = records_of(Estimator(tiny_model, num_draws=0), flux[:1], ivar[:1], ["z"])[0]
    assert record["teff"] > 0
    for name in ("e_teff", "e_logg", "e_fe_h", "raw_e_teff", "raw_e_logg", "raw_e_fe_h"):
        assert record[name] is None


@pytest.mark.parametrize("draws", [-1, 1])
def test_invalid_draw_counts_are_refused(tiny_model, draws):
    with pytest.raises(ValueError, match="num_draws"):
        Estimator(tiny_model, num_draws=draws)


def test_failing_spectrum_gets_runtime_flag_and_others_are_unaffected(tiny_model, spectra, records):
    flux, ivar = (a.copy() for a in spectra)
    flux[2, 400] = 1500.0
    out = records_of(Estimator(Explodes(tiny_model), num_draws=20, seed=5), flux, ivar, [f"s{i}" for i in range(5)])
    bad = out[2]
    assert bad["result_flags"] == ResultFlags.RUNTIME_EXCEPTION
    assert bad["flag_bad"] is True and bad["flag_warn"] is False
    assert all(bad[name] is None for name in ("teff", "logg", "fe_h", "e_teff", "raw_e_fe_h"))
    assert "RuntimeError: boom" in bad["error_message"]
    for i in (0, 1, 3, 4):
        assert_same_result(out[i], records[i])
        assert not out[i]["result_flags"] & ResultFlags.RUNTIME_EXCEPTION


class NaNOutput(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.weights_info = model.weights_info

    def forward(self, x):
        return self.inner(x) * float("nan")


def test_non_finite_outputs_are_never_reported_as_numbers(tiny_model, spectra):
    flux, ivar = spectra
    record = records_of(Estimator(NaNOutput(tiny_model)), flux[:1], ivar[:1], ["n"])[0]
    assert record["teff"] is None and record["result_flags"] == ResultFlags.RUNTIME_EXCEPTION
    assert "not finite" in record["error_message"]


def test_wrong_array_shapes_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        records_of(Estimator(tiny_model), np.zeros(8575), np.zeros(8575))
    with pytest.raises(ValueError, match="3 ids for 1 spectra"):
        records_of(Estimator(tiny_model), np.zeros((1, 8575)), np.zeros((1, 8575)), ["a", "b", "c"])


def test_teff_conversion(tiny_model, spectra, records):
    """raw_e_teff = teff * std(log10 teff) * ln 10, from the draws' spread."""
    r = records[0]
    assert math.isfinite(r["teff"]) and r["teff"] > 0
    assert r["raw_e_teff"] / (r["teff"] * math.log(10)) > 0


def test_engine_fft_switch_keeps_the_numbers_and_can_be_turned_off(spectra):
    """engine.fft: the residual blocks' convolutions by FFT (CPU default) or by direct sums;
    same records to float32 rounding either way."""
    from stream_worker.config import EngineConfig
    from stream_worker.engine.kernels import SpectralConv
    from stream_worker.engine.weights import random_model

    model = random_model(device="cpu", seed=5, channels=(4, 8, 16, 32, 64), pooled_length=8, linear_width=16,
                         linear_layers=1)
    flux, ivar = spectra
    by_fft = Estimator(model, num_draws=4, fft=True, kernels="rules")
    direct = Estimator(model, num_draws=4, fft=False, kernels="rules")
    assert any(isinstance(m, SpectralConv) for m in by_fft.model.modules())
    assert not any(isinstance(m, SpectralConv) for m in direct.model.modules())
    for a, b in zip(records_of(by_fft, flux, ivar), records_of(direct, flux, ivar)):
        assert_same_result(a, b)
    assert EngineConfig().fft is True


def test_the_engine_returns_estimates_not_records(tiny_model, spectra):
    """The seam: science only (no JSON fields, versions or timestamps); records are built elsewhere."""
    from stream_worker.core.estimate import Estimate

    flux, ivar = spectra
    (estimate,) = Estimator(tiny_model, num_draws=4).estimate(flux[:1], ivar[:1], ["e"])
    assert isinstance(estimate, Estimate)
    assert not {"worker_version", "processed_at", "model_name", "schema_version"} & set(vars(estimate))
    assert estimate.e_teff == 1.25 * estimate.raw_e_teff + 10.0 and not estimate.failed


def test_records_name_the_precision_plan_they_were_made_under(tiny_model, spectra):
    """Records are bit-identical only under the same plan, so each says which plan it was."""
    flux, ivar = spectra
    exact = records_of(Estimator(tiny_model, num_draws=4, kernels="rules"), flux[:1], ivar[:1], ["p"])[0]
    fast = records_of(Estimator(tiny_model, num_draws=4, precision="fast", kernels="rules"), flux[:1], ivar[:1],
                      ["p"])[0]
    direct = records_of(Estimator(tiny_model, num_draws=4, fft=False, kernels="rules"), flux[:1], ivar[:1], ["p"])[0]
    assert exact["engine_plan"] == "exact/cpu clean=draws: convs fft-f32x2 head f32"
    assert fast["engine_plan"] == "fast/cpu clean: convs fft-f32x2 head f32; draws: convs fft-f32x2 head bf16"
    assert direct["engine_plan"] == "exact/cpu clean=draws: convs direct-f32x2 head f32"


def test_unknown_precision_fails_instead_of_running_exact(tiny_model):
    with pytest.raises(ValueError, match="unknown precision 'bf16': choose one of exact, fast"):
        Estimator(tiny_model, precision="bf16")


def test_exact_mode_turns_tf32_off():
    """torch leaves cuDNN's TF32 convolutions on by default: on Ampere and Hopper, exact mode
    would not be float32. Building an engine applies its plan's switches."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        engine = Estimator(small_model(), num_draws=0)
        assert engine.plan.tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32 = True  # torch's default
        torch.backends.cuda.matmul.allow_tf32 = False


def test_the_plan_follows_the_device_and_the_network():
    """FFT only on CPUs and only where measured to pay (30 taps, 4x8 channels and wider); fast
    mode's bfloat16 only in the draws' head."""
    from stream_worker.engine.precision import MODES

    full = ((4, 8, 16, 32, 64), 30)
    assert MODES["exact"].plan("cuda", *full).label == "exact/cuda clean=draws: convs direct-f32x8 head f32"
    assert MODES["fast"].plan("cuda", *full).draws.label() == "convs direct-f32x8 head bf16"
    assert MODES["fast"].plan("cuda", *full).clean == MODES["exact"].plan("cuda", *full).clean
    assert MODES["exact"].plan("cpu", (2, 3, 5), 30).clean.convs == ("direct-f32",) * 4
    assert MODES["exact"].plan("cpu", (2, 8, 8), 30).clean.convs == ("direct-f32", "fft-f32", "fft-f32", "fft-f32")


def test_kernels_are_measured_once_per_process_and_stay_within_the_mode(tiny_model, spectra, caplog):
    """engine.kernels: measure (default) times each allowed form on this device and keeps the
    fastest; exact mode never picks bfloat16, fast mode only for the draws (their convolutions
    and head are measured apart); a second engine of the same kind reuses the measurement, so
    all its records share one plan."""
    import logging

    from stream_worker.engine.precision import MODES, parse_plan

    with caplog.at_level(logging.INFO, logger="stream_worker.engine.tuning"):
        exact = Estimator(tiny_model, num_draws=4, precision="exact")
        fast = Estimator(tiny_model, num_draws=4, precision="fast")
        again = Estimator(tiny_model, num_draws=4, precision="fast")
    assert sum("kernels measured" in r.getMessage() for r in caplog.records) <= 3  # clean, draws' convs, head
    assert again.plan == fast.plan
    assert "bf16" not in exact.plan.label and fast.plan.clean == exact.plan.clean
    for engine in (exact, fast):
        assert MODES[engine.plan.mode].check(engine.plan, tiny_model.sizes.channels) is engine.plan
        assert parse_plan(engine.plan.label) == engine.plan


def test_a_pinned_plan_is_used_as_given_and_checked_against_the_mode(tiny_model, spectra):
    flux, ivar = spectra
    label = "fast/cpu clean: convs direct-f32x2 head f32; draws: convs fft-f32x1,direct-f32x1 head bf16"
    pinned = Estimator(tiny_model, num_draws=4, precision="fast", kernels=label)
    assert pinned.plan.label == label
    assert records_of(pinned, flux[:1], ivar[:1], ["q"])[0]["engine_plan"] == label
    with pytest.raises(ValueError, match="'bf16' is not allowed in exact mode"):
        Estimator(tiny_model, precision="exact", kernels="exact/cpu clean=draws: convs direct-f32x2 head bf16")
    with pytest.raises(ValueError, match="clean convolution 0: 'direct-bf16' is not allowed in fast mode"):
        Estimator(tiny_model, precision="fast", kernels="fast/cpu clean=draws: convs direct-bf16x2 head f32")
    with pytest.raises(ValueError, match="unknown layer forms"):
        Estimator(tiny_model, precision="fast", kernels="fast/cpu clean=draws: convs direct-f16x2 head f32")
    with pytest.raises(ValueError, match="the pinned plan is for cuda"):
        Estimator(tiny_model, kernels="exact/cuda clean=draws: convs direct-f32x2 head f32")
    with pytest.raises(ValueError, match="not a precision plan"):
        Estimator(tiny_model, kernels="fastest please")


class Garbage(torch.nn.Module):
    """A reduced-precision form as a broken kernel computes it: the right shape, wrong numbers
    (torch 2.15's CPU bfloat16 convolution does that for 8 input channels and width 8 on AMX)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).flip(-1)


class RoundedToBFloat16(Garbage):
    """A correct bfloat16 form: input and output rounded, float32 sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.bfloat16().float()).bfloat16().float()


@pytest.mark.parametrize("form, used", [(Garbage, False), (RoundedToBFloat16, True)])
def test_a_reduced_precision_convolution_is_used_only_if_it_computes_what_float32_does(form, used, monkeypatch,
                                                                                        caplog):
    """Whatever the timings, a bfloat16 form that gives other numbers than float32 at its layer's
    shape is never measured into a plan, and a pinned plan holding it is refused."""
    import logging

    from stream_worker.engine import kernels, tuning
    from stream_worker.engine.precision import MODES, parse_plan
    from stream_worker.engine.weights import random_model

    real_conv_as = kernels.conv_as
    monkeypatch.setattr(tuning, "conv_as", lambda conv, f: form(conv) if f == "direct-bf16" else real_conv_as(conv, f))
    monkeypatch.setattr(tuning, "_time", lambda module, x, device: 0.1 if isinstance(module, Garbage) else 1.0)
    monkeypatch.setattr(tuning, "_MEASURED", {})
    monkeypatch.setattr(tuning, "_TIMINGS", {})
    model = random_model(device="cpu", seed=4, channels=(2, 4, 4), kernel_size=8, pooled_length=4, linear_width=4,
                         linear_layers=1)
    with caplog.at_level(logging.WARNING, logger="stream_worker.engine.tuning"):
        plan = tuning.measured_plan(model, MODES["fast"], torch.device("cpu"), 16)
    assert ("direct-bf16" in plan.draws.convs) is used  # the fastest form, when it is right
    assert "direct-bf16" not in plan.clean.convs
    assert any("computes conv" in r.getMessage() and "wrongly" in r.getMessage() for r in caplog.records) is not used
    pinned = parse_plan("fast/cpu clean: convs direct-f32x4 head f32; draws: convs direct-f32x2,direct-bf16x2 head f32")
    if used:
        assert tuning.checked_plan(model, pinned, torch.device("cpu"), 16) is pinned
    else:
        with pytest.raises(ValueError, match="convolution 2 in direct-bf16 computes wrongly on cpu"):
            tuning.checked_plan(model, pinned, torch.device("cpu"), 16)


def test_kernels_are_measured_for_a_head_without_hidden_layers(spectra):
    """The I/O benchmark's trivial network has a single linear layer as its whole head."""
    from stream_worker.engine.weights import random_model

    model = random_model(device="cpu", seed=2, channels=(2, 2), kernel_size=4, pooled_length=4, linear_width=4,
                         linear_layers=0)
    flux, ivar = spectra
    engine = Estimator(model, num_draws=0, precision="fast")
    assert engine.plan.draws.head in ("f32", "bf16") and engine.estimate(flux[:1], ivar[:1])[0].teff > 0


PAGE_FAULTS = """
import resource
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.host_memory import keep_freed_memory
from stream_worker.engine.weights import random_model
from tests.helpers import synthetic_spectra

model = random_model(device="cpu", seed=1, pooled_length=16, linear_width=32, linear_layers=2)
engine = Estimator(model, num_draws=20, seed=0, kernels="rules")
flux, ivar = synthetic_spectra(1, seed=2)
engine.estimate(flux, ivar, ["a"])  # the first pass grows the heap to its peak
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.estimate(flux, ivar, ["a"])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(keep_freed_memory(), min(faults))
"""


@pytest.mark.parametrize("operator_setting, kept", [(None, True), ("MALLOC_MMAP_THRESHOLD_=131072", False)])
def test_a_cpu_engine_reuses_freed_memory_unless_the_operator_set_malloc(operator_setting, kept):
    """A pass of the full-width trunk frees and allocates 1-18 MiB tensors; glibc's defaults
    mmap each afresh and fault its pages in again (~15% of the pass). The engine keeps them,
    unless the operator's MALLOC_* setting says otherwise."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if operator_setting:
        name, value = operator_setting.split("=")
        env[name] = value
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    reported, faults = out[0] == "True", int(out[1])
    assert reported == kept
    # 21 rows of 64 channels x 4,288 samples: each fresh 1-18 MiB tensor is hundreds to thousands of
    # pages (~20,000 a pass); a kept heap faults none in most passes (the fewest of three counts)
    assert faults < 1_000 if kept else faults > 10_000, faults
