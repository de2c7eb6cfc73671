"""The faster computations block reconstruction runs its layers with, against PyTorch's own: the
direct depthwise weight gradient (shared with optimize_layer), the grouped convolution built on it,
convolutions on small maps as matrix products and the ChannelClip's gradient (the activation fake
quantization: test_activation_quant.py)."""
import pytest
import torch
import torch.nn.functional as F

from adaround_ext import _C
from adaround_ext.blocks import GroupedConv2d, ReconstructionClip, SoftLayer
from adaround_ext.modules import ChannelClip


def library_weight_grad(grad, x, weight_shape, stride, padding, dilation, groups):
    return torch.ops.aten.convolution_backward(grad, x, torch.empty(weight_shape, dtype=x.dtype), None, stride,
                                               padding, dilation, False, [0, 0], groups, [False, True, False])[1]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels, multiplier, size, kernel, stride, padding, dilation", [
    (8, 1, (2, 2), (3, 3), (1, 1), (1, 1), (1, 1)),   # MobileNetV2's late blocks
    (6, 2, (5, 3), (3, 3), (2, 1), (1, 0), (1, 1)),   # two outputs per channel, uneven geometry
    (5, 1, (4, 4), (3, 2), (1, 1), (2, 1), (2, 1)),   # dilated, non-square kernel
    (7, 1, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1)),   # a kernel cropped to its one live tap
    (3, 3, (9, 9), (5, 5), (3, 3), (2, 2), (1, 1)),
    (64, 2, (3, 3), (3, 3), (1, 1), (1, 1), (1, 1)),  # 128 output channels: split over the threads
])
def test_direct_depthwise_weight_grad_equals_the_library(channels, multiplier, size, kernel, stride, padding,
                                                         dilation, channels_last):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        check_direct_depthwise_weight_grad(channels, multiplier, size, kernel, stride, padding, dilation, channels_last)
    finally:
        torch.set_num_threads(threads)


def check_direct_depthwise_weight_grad(channels, multiplier, size, kernel, stride, padding, dilation, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, channels, *size, generator=g, dtype=torch.float64)
    weight = torch.randn(channels * multiplier, 1, *kernel, generator=g, dtype=torch.float64)
    out = F.conv2d(x, weight, None, stride, padding, dilation, channels)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    if channels_last:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    got = _C.depthwise_weight_grad(grad, x, kernel, stride, padding, dilation)
    expected = library_weight_grad(grad, x, weight.shape, stride, padding, dilation, channels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got32 = _C.depthwise_weight_grad(grad.float(), x.float(), kernel, stride, padding, dilation)
    torch.testing.assert_close(got32, expected.float(), rtol=1e-5, atol=1e-5)


def test_direct_depthwise_gradient_is_taken_where_it_is_faster():
    x, small, large = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 5, 5)
    assert _C.direct_depthwise_grad_applies(small, x, 4)  # 16 output positions
    assert not _C.direct_depthwise_grad_applies(large, x, 4)  # 25: the library's
    assert not _C.direct_depthwise_grad_applies(small, x, 2)  # grouped, not depthwise
    assert not _C.direct_depthwise_grad_applies(small.half(), x.half(), 4)
    assert not _C.direct_depthwise_grad_applies(small, x, 1)
    assert not _C.direct_depthwise_grad_applies(small, x.double(), 4)
    _C.set_cuda_emulation(True)  # the GPU's form of the loop: the library's gradient, as a GPU runs it
    try:
        assert not _C.direct_depthwise_grad_applies(small, x, 4)
    finally:
        _C.set_cuda_emulation(False)



@pytest.mark.parametrize("grad_shape, x_shape, message", [
    ((2, 8, 2, 2), (2, 4, 2, 2), "does not match the output"),  # 3x3, padding 0 leaves no output
    ((2, 6, 2, 2), (2, 4, 4, 4), "not a multiple"),
    ((3, 4, 2, 2), (2, 4, 4, 4), "samples"),
    ((2, 4, 2), (2, 4, 4, 4), "4-D"),
])
def test_direct_depthwise_weight_grad_refuses_mismatched_arguments(grad_shape, x_shape, message):
    with pytest.raises(RuntimeError, match=message):
        _C.depthwise_weight_grad(torch.randn(grad_shape), torch.randn(x_shape), [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="stride and dilation must be positive"):
        _C.depthwise_weight_grad(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 4, 4), [3, 3], [0, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="is Double but grad_out is Float"):
        _C.depthwise_weight_grad(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 4, 4).double(), [3, 3], [1, 1], [0, 0],
                                 [1, 1])


@pytest.mark.parametrize("size", [2, 6])  # the direct weight gradient, and the library's
@pytest.mark.parametrize("multiplier", [1, 2])
def test_grouped_conv2d_gradients_pass_gradcheck(monkeypatch, size, multiplier):
    calls = []
    direct = _C.depthwise_weight_grad
    monkeypatch.setattr(_C, "depthwise_weight_grad", lambda *a: calls.append(1) or direct(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4 * multiplier, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4 * multiplier, generator=g, dtype=torch.float64, requires_grad=True)
    geometry = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4)
    assert torch.autograd.gradcheck(lambda *a: GroupedConv2d.apply(*a, geometry), (x, weight, bias))
    assert bool(calls) == (size == 2)  # 4 output positions: direct; 36: the library's
    assert torch.allclose(GroupedConv2d.apply(x, weight, bias, geometry), F.conv2d(x, weight, bias, **geometry))


def test_grouped_conv2d_gradients_without_bias_or_input_gradient_on_channels_last_data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 2, 2, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, 3, 3, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    geometry = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=8)
    out = GroupedConv2d.apply(x, weight, None, geometry)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got, = torch.autograd.grad(out, weight, grad)
    expected, = torch.autograd.grad(F.conv2d(x, weight, None, **geometry), weight, grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size, kernel, stride, padding, channels_last, weighted_sum", [
    (1, 1, 1, 0, False, True),   # MobileNetV2's 1x1 maps, the 3x3 kernel cropped to its live tap
    (2, 2, 2, 0, True, True),    # its stride-2 block on a 2x2 map, cropped to 2x2
    (1, 1, 2, 0, True, True),
    (2, 3, 1, 1, True, False),   # padded: several output positions, the grouped convolution
])
def test_a_depthwise_kernel_over_its_whole_map_is_a_weighted_sum_equal_to_the_convolution(
        monkeypatch, size, kernel, stride, padding, channels_last, weighted_sum):
    grouped = []
    apply = GroupedConv2d.apply
    monkeypatch.setattr(GroupedConv2d, "apply", lambda *a: grouped.append(1) or apply(*a))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, size, size, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(6, 1, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    geometry = dict(stride=(stride, stride), padding=(padding, padding), dilation=(1, 1), groups=6)
    layer = SoftLayer("conv2d", bias, geometry)
    layer.weight = weight
    out = layer(x)
    expected = F.conv2d(x, weight, bias, **geometry)
    assert bool(grouped) != weighted_sum
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(expected, (x, weight, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size, channels_last", [(1, False), (4, False), (5, False), (5, True), (12, True)])
def test_a_1x1_convolution_as_a_matrix_product_equals_the_convolution(size, channels_last):
    """NCHW 5x5: past the matrix-product threshold, the library's; on NHWC data always a product."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, size, size, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(5, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    layer = SoftLayer("conv2d", bias, dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1))
    layer.weight = weight
    out = layer(x)
    expected = F.conv2d(x, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # The matrix product's output is NHWC in memory, the library's NCHW here (a 1x1 map is both).
    assert out.is_contiguous() == (size == 1 or (size == 5 and not channels_last))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, weight), grad)
    want = torch.autograd.grad(expected, (x, weight), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size, kernel, stride, padding, unfolded", [
    ((2, 2), (3, 3), (1, 1), (1, 1), True),   # resnet18's layer3 on the testbed: 4 positions
    ((4, 4), (3, 3), (2, 2), (1, 1), True),   # its strided first convolution into them
    ((2, 2), (2, 2), (2, 2), (0, 0), True),   # a 3x3 kernel cropped to its live taps: 1 position
    ((4, 4), (1, 1), (2, 2), (0, 0), True),   # a strided 1x1 shortcut
    ((3, 3), (2, 3), (1, 2), (1, 0), True),   # uneven geometry: 4 x 1 positions
    ((4, 4), (3, 3), (1, 1), (1, 1), False),  # 16 positions: the library's
])
def test_a_convolution_on_a_small_map_as_a_matrix_product_equals_the_convolution(size, kernel, stride, padding,
                                                                                   unfolded, channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, *size, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(5, 6, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    geometry = dict(stride=stride, padding=padding, dilation=(1, 1), groups=1)
    layer = SoftLayer("conv2d", bias, geometry)
    layer.weight = weight
    out = layer(x)
    expected = F.conv2d(x, weight, bias, **geometry)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # The matrix product's output is NHWC in memory; the library's follows its input.
    if out.shape[2] * out.shape[3] > 1 and not channels_last:
        assert out.is_contiguous() != unfolded
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(expected, (x, weight, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, channel_dim, channels_last", [
    ((4, 5, 3, 3), 1, False), ((4, 5, 3, 3), 1, True), ((4, 3, 5), -1, False)])
def test_the_reconstruction_clip_equals_the_channel_clip_with_the_clamp_derivative(shape, channel_dim, channels_last):
    g = torch.Generator().manual_seed(4)
    upper = torch.rand(5, generator=g, dtype=torch.float64) * 2 + 0.5
    clip = ChannelClip(upper, channel_dim)
    clip.upper = clip.upper.double()
    # values clear of 0 and of the bounds: there the derivative is 1 inside, 0 outside
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    moved_upper = upper if channel_dim == -1 else upper.view(5, *[1] * (len(shape) - 2))
    near = (x.abs() < 0.05) | ((x - moved_upper).abs() < 0.05)
    x = torch.where(near, x + 0.1, x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    fast = ReconstructionClip(clip)
    out = fast(x)
    assert torch.equal(out, clip(x))
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    got, = torch.autograd.grad(out, x, grad)
    inside = (x > 0) & (x < moved_upper)
    assert 0 < inside.sum() < inside.numel()  # both cases are exercised
    torch.testing.assert_close(got, torch.where(inside, grad, 0.0), rtol=0, atol=0)
    assert torch.autograd.gradcheck(fast, (x,))


@pytest.mark.parametrize("channels, size", [(16, 8), (16, 4), (8, 8), (16, 6)])
def test_a_block_runs_larger_3x3_convolutions_as_the_library_does(channels, size):
    """Beyond the matrix products' maps a dense 3x3 convolution is the library's own, bit for bit,
    forward and backward (the per-layer loop's Winograd tiles lost to oneDNN's convolutions inside a
    block: benchmarks/README.md)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(8, channels, 3, 3, generator=g, requires_grad=True)
    layer = SoftLayer("conv2d", None, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1))
    layer.weight = weight
    out = layer(x)
    expected = F.conv2d(x, weight, None, padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
