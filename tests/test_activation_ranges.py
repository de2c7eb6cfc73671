"""Activation range calibration (minmax, mse, percentile) against plain formulas."""
import math

import pytest
import torch
import torch.nn as nn

import adaround_ext as ae
from adaround_ext.activation_ranges import RangeObserver, activation_grid


def quantization_mse(x, lo, hi, bits):
    """Plain formula: x -> s * (clamp(round(x / s) + z, 0, 2^b - 1) - z) on the grid over [lo, hi] with 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (2**bits - 1), 1e-8)
    zero = min(max(round(-lo / scale), 0), 2**bits - 1)
    q = (torch.clamp(torch.round(x.double() / scale) + zero, 0, 2**bits - 1) - zero) * scale
    return (q - x.double()).pow(2).mean().item()


def outlier_data(seed=0):
    """Heavy-tailed non-negative values (|N(0, 1)| / sqrt(U)): a few large ones set the min/max range."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4096, generator=g) / torch.rand(4096, generator=g).clamp_min(1e-3).sqrt()).abs()


def observed(x, chunks=4):
    observer = RangeObserver()
    for part in x.chunk(chunks):
        observer.observe(part)
    return observer


def test_minmax_is_the_observed_range():
    x = outlier_data()
    assert observed(x).range("minmax", 8) == (x.min().item(), x.max().item())


def test_percentile_is_the_quantile_of_the_values():
    x = outlier_data()
    lo, hi = observed(x).range("percentile", 8, percentile=99.0)
    expected = torch.quantile(x.double(), torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    assert (lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_has_the_least_error_of_the_clippings(bits):
    x = outlier_data()
    lo, hi = observed(x).range("mse", bits)
    chosen = quantization_mse(x, lo, hi, bits)
    if bits == 4:  # at 4 bits the step matters more than the clipped tail: the range halves
        assert hi < 0.6 * x.max().item()
    assert chosen < quantization_mse(x, x.min().item(), x.max().item(), bits)
    # Against a finer search of the same clipping family, by the plain formula.
    finest = min(quantization_mse(x, x.min().item() * r, x.max().item() * r, bits)
                 for r in torch.linspace(0.005, 1.0, 400).tolist())
    assert chosen <= finest * 1.05


def test_large_activations_are_sampled_with_a_fixed_seed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 300_000, generator=g)
    first, second = observed(x, 8), observed(x, 8)
    assert first.range("mse", 8) == second.range("mse", 8)
    assert first.range("minmax", 8) == (x.min().item(), x.max().item())  # min/max see every value


def test_grid_holds_zero_and_the_range():
    scale, zero_point, n, p = activation_grid(0.5, 10.0, 8)
    assert (n, p, zero_point) == (0, 255, 0) and scale == pytest.approx(10.0 / 255)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("quantized_inputs", [False, True])
@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
def test_pipeline_calibrates_each_input_by_the_method(method, quantized_inputs):
    model = net()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    x[0] *= 50  # an outlier sample
    config = ae.QuantConfig(weight_bits=8, activation_bits=8, iterations=20, batch_size=16, num_samples=256,
                            progress=False, device="cpu", activation_range=method, quantized_inputs=quantized_inputs)
    q = ae.quantize(model, x, config)
    report = {r.name: r for r in q.adaround_report.layers}
    first = q.get_submodule("0").input_quantizer
    lo, hi = report["0"].input_range
    # The first layer sees the calibration data itself: its range follows from the method on x.
    assert (lo, hi) == pytest.approx(observed(x, 2).range(method, 8), rel=1e-6)
    assert first.scale.item() == pytest.approx(activation_grid(lo, hi, 8)[0], rel=1e-6)
    if method != "minmax":
        assert hi < x.max().item()
    assert "input range" in q.adaround_report.table()


@pytest.mark.parametrize("field, value, message", [
    ("activation_range", "entropy", "activation_range must be one of minmax, mse, percentile"),
    ("activation_percentile", 40.0, r"activation_percentile must be in \(50, 100\]"),
])
def test_config_checks_the_range_options(field, value, message):
    with pytest.raises(ValueError, match=message):
        ae.QuantConfig(**{field: value})


def test_nan_activations_are_named_not_skipped():
    """Was: a NaN batch passed min/max unseen (Python's min keeps the old value against NaN): the MSE search
    then chose 1 % of the range, the percentile failed converting NaN, an all-NaN input got no quantizer."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1e30, -1e30, 0, 0]] * 4))  # inf - inf = NaN at the second layer
    x = torch.ones(32, 4) * 1e10
    for method in ("minmax", "mse", "percentile"):
        config = ae.QuantConfig(rounding="nearest", activation_bits=8, activation_range=method, num_samples=32,
                                batch_size=8, progress=False, device="cpu")
        with pytest.raises(ValueError, match="layer 1: its input holds NaN or Inf"):
            ae.quantize(model, x, config)
    observer = RangeObserver()
    observer.observe(torch.tensor([1.0, 2.0]))
    observer.observe(torch.tensor([float("nan"), 3.0]))
    observer.observe(torch.tensor([0.5]))
    assert math.isnan(observer.lo) and math.isnan(observer.hi)
