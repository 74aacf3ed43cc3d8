import pytest
import torch

from stream_worker.fused import FusedApogeeNet
from stream_worker.model import ApogeeNet, random_model


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


@pytest.mark.parametrize("sizes", [{}, dict(channels=(4, 7, 12), pooled_length=16, linear_width=32, linear_layers=2)])
def test_exact_fused_network_computes_the_same_function(sizes):
    model = with_trained_like_batchnorm(random_model(device="cpu", seed=3, **sizes))
    x = inputs()
    with torch.inference_mode():
        expected = model(x)
        fused = FusedApogeeNet(model, "exact")(x)
    assert torch.allclose(fused, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_fast_network_stays_close_and_keeps_float32_at_the_ends():
    model = with_trained_like_batchnorm(random_model(device="cpu", seed=3))
    fast = FusedApogeeNet(model, "fast")
    assert fast.first_conv.weight.dtype == torch.float32
    assert fast.res_blocks[0].conv1.weight.dtype == torch.float32
    assert fast.res_blocks[3].conv1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in fast.linear_sequential.parameters())
    x = inputs()
    with torch.inference_mode():
        expected, out = model(x), fast(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        FusedApogeeNet(ApogeeNet(channels=(4, 8), pooled_length=4, linear_width=4, linear_layers=1), "half")
