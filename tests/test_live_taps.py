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
    """Conv1d/Conv2d geometries with padding up to one past the kernel's reach and input sizes from 1
    (or the least that gives an output) up to a few kernels; 2-D ones sometimes with the one-element
    stride/padding/dilation tuples torch expands."""
    spatial = draw(st.integers(1, 2))
    uniform = spatial == 2 and draw(st.booleans())

    def per_dim(lo, hi):
        return (draw(st.integers(lo, hi)),) * spatial if uniform else tuple(
            draw(st.integers(lo, h)) for h in (hi if isinstance(hi, tuple) else (hi,) * spatial))

    kernel = tuple(draw(st.integers(1, 5)) for _ in range(spatial))
    stride, dilation = per_dim(1, 3), per_dim(1, 2)
    reach = tuple((k - 1) * d for k, d in zip(kernel, dilation))
    padding = per_dim(0, min(reach) + 1 if uniform else tuple(r + 1 for r in reach))
    size = tuple(draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 4))
                 for k, d, p in zip(kernel, dilation, padding))
    groups = draw(st.sampled_from([1, 2]))
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if uniform:  # what the layer's geometry may hold: one value for every dimension
        geometry.update({key: geometry[key][:1] for key in ("stride", "padding", "dilation")})
    return spatial, kernel, stride, padding, dilation, size, groups, geometry


@SWEEP
@given(convolutions(), st.integers(0, 2**16))
def test_the_cropped_convolution_equals_the_full_one(conv, seed):
    spatial, kernel, stride, padding, dilation, size, groups, geometry = conv
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2 * groups, *size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    functional = F.conv1d if spatial == 1 else F.conv2d
    full = functional(x, w, None, **geometry)
    grad_out = torch.randn(full.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(full, [x, w], grad_out)
    # The live taps by the full convolution's weight gradient (random data: a tap that reads an
    # input element gets a nonzero gradient, one that reads only padding exactly zero).
    symmetric = True
    for dim in range(spatial):
        others = [d for d in range(w.dim()) if d != 2 + dim]
        live = (expected[1].abs().sum(dim=others) > 0).nonzero().flatten().tolist()
        first, last = live_tap_range(size[dim], kernel[dim], stride[dim], padding[dim], dilation[dim])
        assert (first, last) == ((live[0], live[-1]) if live else (0, kernel[dim] - 1)), dim  # none: all kept
        symmetric &= first + last == kernel[dim] - 1 and first * dilation[dim] <= padding[dim]
    window = live_window(w.shape, x.shape, geometry)
    narrower = any(live_tap_range(*args) != (0, args[1] - 1) for args in zip(size, kernel, stride, padding, dilation))
    if symmetric and narrower:  # the cropped kernel is centred: always the same output positions
        assert window is not None
    if window is None:
        return
    index, cropped_geometry = window
    cropped = functional(x, w[index], None, **cropped_geometry)
    torch.testing.assert_close(cropped, full, rtol=1e-12, atol=1e-12)
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
