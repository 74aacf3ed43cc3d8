import pytest
import torch

from stream_worker.engine.kernels import FusedApogeeNet, SpectralConv, pairwise_max
from stream_worker.engine.network import ApogeeNet
from stream_worker.engine.precision import NetworkForm, precision_mode
from stream_worker.engine.weights import random_model


def network(model: ApogeeNet, precision: str = "exact", fft: bool = True) -> FusedApogeeNet:
    """The fused network the engine runs its Monte Carlo draws through in ``precision`` on a CPU
    (in exact mode also its clean pass)."""
    plan = precision_mode(precision).plan("cpu", model.sizes.channels, model.sizes.kernel_size, fft=fft)
    return FusedApogeeNet(model, plan.draws)


def inputs(n: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return (torch.randn(n, 1, 8575) * 0.2 + 6).clamp(max=7)  # log flux as the preprocessing makes it


def with_trained_like_batchnorm(model: ApogeeNet) -> ApogeeNet:
    """Non-trivial BatchNorm statistics, so folding them into the convolutions is really tested."""
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("spectral", [True, False])
@pytest.mark.parametrize("sizes", [{}, dict(channels=(4, 7, 12), pooled_length=16, linear_width=32, linear_layers=2)])
def test_exact_fused_network_computes_the_same_function(sizes, spectral):
    model = with_trained_like_batchnorm(random_model(device="cpu", seed=3, **sizes))
    x = inputs()
    with torch.inference_mode():
        expected = model(x)
        fused = network(model, "exact", fft=spectral)(x)
    assert torch.allclose(fused, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("precision, spectral", [("exact", True), ("exact", False), ("fast", False)])
def test_a_row_gives_the_same_bits_among_any_number_of_rows(precision, spectral):
    """Kernels block (and round) by shape; fixed-size passes make a row's output independent of
    how many rows share its call and where it sits among them."""
    fused = network(with_trained_like_batchnorm(random_model(device="cpu", seed=3)), precision, fft=spectral)
    x = inputs(21)
    with torch.inference_mode():
        together = fused(x)
        for part in (slice(0, 1), slice(4, 9), slice(20, 21), slice(3, 20)):
            assert torch.equal(fused(x[part]), together[part]), part


def test_the_residual_convolutions_run_by_fft_on_cpu_in_both_precisions():
    model = random_model(device="cpu", seed=3)
    for precision in ("exact", "fast"):
        fused = network(model, precision)
        spectral = [name for name, module in fused.named_modules() if isinstance(module, SpectralConv)]
        assert spectral == [f"res_blocks.{i}.conv{j}" for i in range(4) for j in (1, 2)]
    assert not any(isinstance(m, SpectralConv) for m in network(model, "exact", fft=False).modules())


def test_fast_form_on_cpu_has_only_the_heads_first_layer_in_bfloat16():
    """The fixed rules reduce only the head's big first layer, so the trunk computes exactly what
    the exact form does (a bfloat16 convolution is used only after its start-up check: measured plans)."""
    model = with_trained_like_batchnorm(random_model(device="cpu", seed=3))
    exact, fast = network(model, "exact"), network(model, "fast")
    in_bfloat16 = {name for name, p in fast.named_parameters() if p.dtype == torch.bfloat16}
    assert in_bfloat16 == {f"linear_sequential.0.module.linear_layer.{p}" for p in ("weight", "bias")}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the module's own head is not touched
    x = inputs()
    with torch.inference_mode():
        assert torch.equal(fast.features(x), exact.features(x))
        assert torch.allclose(fast(x), exact(x), rtol=0.02, atol=0.02 * exact(x).abs().max().item())


def test_short_kernels_and_narrow_channels_stay_direct():
    model = random_model(device="cpu", seed=3, channels=(2, 3, 5), kernel_size=8, pooled_length=4,
                         linear_width=4, linear_layers=1)
    assert not any(isinstance(m, SpectralConv) for m in network(model, "exact").modules())


@pytest.mark.parametrize("in_channels, out_channels, taps, padding, length, tile", [
    (64, 64, 30, 14, 4288, 256),  # the last block's second convolution
    (32, 64, 30, 15, 4288, 256),  # its first (output one sample longer)
    (4, 8, 30, 15, 4288, 256),    # the first block's first
    (3, 5, 8, 4, 1000, 32),       # a tile that does not divide the output; small kernel
    (2, 2, 30, 15, 31, 64),       # an input shorter than one tile
])
@pytest.mark.parametrize("rows", [2, 3])  # rounds of 2 rows (CPUs) and all 3 in one (GPUs)
def test_fft_convolution_equals_the_direct_sum(in_channels, out_channels, taps, padding, length, tile, rows):
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(in_channels, out_channels, (1, taps), padding=(0, padding))
    x = torch.randn(3, in_channels, 1, length)
    with torch.inference_mode():
        expected = conv(x)
        got = SpectralConv(conv, tile, rows=rows)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-6 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("device, rounds", [("cpu", 32), ("meta", 1)])
def test_fft_convolution_takes_a_gpu_trunk_pass_in_one_round(monkeypatch, device, rounds):
    """CPUs keep 2 rows per round in cache; on any other device a 64-row trunk pass in 2-row
    rounds would be 32 rounds of small kernel launches per convolution (``meta`` stands in for a
    GPU: shapes without arithmetic)."""
    conv = torch.nn.Conv2d(8, 16, (1, 30), padding=(0, 15), device=device)
    spectral = SpectralConv(conv)
    calls = []
    rfft = torch.fft.rfft
    monkeypatch.setattr(torch.fft, "rfft", lambda *args, **kwargs: calls.append(1) or rfft(*args, **kwargs))
    with torch.inference_mode():
        out = spectral(torch.empty(64, 8, 1, 1000, device=device))
    assert out.shape == (64, 16, 1, 1001)
    assert len(calls) == rounds


def test_fft_tile_must_exceed_the_kernel():
    with pytest.raises(ValueError, match="tile"):
        SpectralConv(torch.nn.Conv2d(1, 1, (1, 30)), tile=30)


def test_fast_network_without_fft_keeps_every_convolution_in_float32():
    """Where convolutions run direct (GPUs, engine.fft false) fast mode's fixed rules still reduce
    only the head's first layer: a bfloat16 convolution needs its start-up check (precision.py)."""
    model = with_trained_like_batchnorm(random_model(device="cpu", seed=3))
    fast = network(model, "fast", fft=False)
    assert all(p.dtype == torch.float32 for p in fast.res_blocks.parameters())
    assert fast.linear_sequential[0].module.linear_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in fast.linear_sequential[1:].parameters())
    x = inputs()
    with torch.inference_mode():
        expected, out = model(x), fast(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_unknown_precision_and_forms_are_refused():
    with pytest.raises(ValueError, match="unknown precision 'half': choose one of exact, fast"):
        precision_mode("half")
    with pytest.raises(ValueError, match="unknown layer forms"):
        NetworkForm(("direct-f16",))
    model = ApogeeNet(channels=(4, 8), pooled_length=4, linear_width=4, linear_layers=1)
    with pytest.raises(ValueError, match="the form has 4 convolutions, the network 2"):
        FusedApogeeNet(model, NetworkForm(("direct-f32",) * 4))


@pytest.mark.parametrize("length", [8575, 8574, 3])
def test_pairwise_max_is_max_pooling_by_two(length):
    x = torch.randn(3, 4, 1, length).contiguous(memory_format=torch.channels_last)
    x[0, 1, 0, :4] = torch.tensor([float("nan"), 1.0, -2.0, float("nan")])[:length]
    expected = torch.nn.functional.max_pool2d(x, (1, 2))
    assert torch.equal(pairwise_max(x).isnan(), expected.isnan())
    assert torch.equal(pairwise_max(x).nan_to_num(), expected.nan_to_num())


def test_a_block_of_two_bfloat16_convolutions_keeps_its_middle_activation_in_bfloat16():
    """The same numbers as each convolution rounding its own input (the ELU between them is
    computed in float32 from bfloat16 values either way), within bfloat16's rounding of float32."""
    from stream_worker.engine.kernels import FusedResBlock, InBFloat16

    model = with_trained_like_batchnorm(random_model(device="cpu", seed=3, channels=(4, 16), kernel_size=30,
                                                     pooled_length=4, linear_width=4, linear_layers=1))
    block = FusedResBlock(model.res_blocks[0], ("direct-bf16", "direct-bf16"))
    exact = FusedResBlock(model.res_blocks[0], ("direct-f32", "direct-f32"))
    assert isinstance(block.conv1, InBFloat16) and isinstance(block.conv2, InBFloat16)
    torch.manual_seed(5)
    x = torch.randn(16, 4, 1, 500).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        separate = block.conv2(torch.nn.functional.elu(block.conv1(x)))
        separate[:, block.first_channel : block.first_channel + 4] += x
        separate = torch.nn.functional.elu(separate)
        fused, expected = block(x), exact(x)
    assert fused.dtype == torch.float32 and torch.equal(fused, separate)
    assert ((fused - expected).norm() / expected.norm()).item() < 0.01


@pytest.mark.parametrize("length, pooled", [(4288, 1024), (4289, 1024), (37, 16), (16, 16)])
def test_channels_last_pooling_gives_the_bits_of_the_modules_pooling(length, pooled):
    """The fused trunk pools channels-last rows (vectorised over channels, ~9x faster); it must
    sum and divide exactly as the module's AdaptiveAvgPool1d on contiguous rows, signed zeros too."""
    torch.manual_seed(4)
    x = torch.randn(5, 64, 1, length)
    x[0, 0, 0, :12] = -0.0
    expected = torch.nn.AdaptiveAvgPool1d(pooled)(x.squeeze(2))
    pooled_rows = torch.nn.functional.adaptive_avg_pool2d(x.contiguous(memory_format=torch.channels_last), (1, pooled))
    assert torch.equal(pooled_rows.squeeze(2), expected)
    assert torch.equal(torch.signbit(pooled_rows.squeeze(2)), torch.signbit(expected))
