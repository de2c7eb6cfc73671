"""The cropped convolution of live_taps.py against the full one (Hypothesis over geometries): the same
output, and the same gradient for the input and for every tap of the full weight (zero for the dead
ones, through the index)."""
import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from adaround_ext.live_taps import live_tap_range, live_window  # noqa: E402

SWEEP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def convolutions(draw):
    spatial = draw(st.integers(1, 2))
    dims = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(spatial))  # noqa: E731
    kernel, stride, dilation = dims(1, 5), dims(1, 3), dims(1, 2)
    padding = tuple(draw(st.integers(0, (k - 1) * d)) for k, d in zip(kernel, dilation))
    # Input sizes from 1 up to a few kernels' reach, with at least one output position.
    size = tuple(draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 4))
                 for k, d, p in zip(kernel, dilation, padding))
    groups = draw(st.sampled_from([1, 2]))
    return spatial, kernel, stride, padding, dilation, size, groups


@SWEEP
@given(convolutions(), st.integers(0, 2**16))
def test_the_cropped_convolution_equals_the_full_one(conv, seed):
    spatial, kernel, stride, padding, dilation, size, groups = conv
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2 * groups, *size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    functional = F.conv1d if spatial == 1 else F.conv2d
    full = functional(x, w, None, **geometry)
    index, cropped_geometry = live_window(w.shape, x.shape, geometry) or ((slice(None),), geometry)
    cropped = functional(x, w[index], None, **cropped_geometry)
    torch.testing.assert_close(cropped, full, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(full.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(full, [x, w], grad_out)
    got = torch.autograd.grad(cropped, [x, w], grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_taps_that_only_read_padding_are_cropped():
    assert live_tap_range(1, 3, 1, 1, 1) == (1, 1)  # a 3x3 kernel on a 1x1 map: its centre
    assert live_tap_range(2, 3, 2, 1, 1) == (1, 2)  # stride 2 on a 2x2 map: one output reading rows 0, 1
    assert live_tap_range(8, 3, 1, 1, 1) == (0, 2)
    w = torch.zeros(4, 4, 3, 3)
    geometry = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    index, cropped_geometry = live_window(w.shape, (2, 4, 1, 1), geometry)
    assert w[index].shape == (4, 4, 1, 1) and cropped_geometry["padding"] == (0, 0)
    assert live_window(w.shape, (2, 4, 5, 5), geometry) is None  # every tap live
