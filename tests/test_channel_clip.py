"""torch.ops.adaround.channel_clip (block reconstruction's form of a ChannelClip) against the ChannelClip
module's PyTorch formula and the threshold-mask gradient written out with torch.where, over dtypes,
memory layouts and channel dimensions (a Hypothesis sweep), with opcheck, gradcheck and bad input; on
the CPU kernels, the emulated CUDA kernels and a GPU."""
import pytest
import torch

from adaround_ext import _C
from adaround_ext._ops import channel_clip
from adaround_ext.modules import ChannelClip
from conftest import needs_cuda

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ops = torch.ops.adaround


def bounds_view(upper, shape, dim):
    """upper shaped to broadcast along dimension `dim` of `shape`."""
    sizes = [1] * len(shape)
    sizes[dim] = -1
    return upper.view(sizes)


def reference(x, upper, dim, grad):
    """(values, input gradient): the ChannelClip module's formula and grad where 0 < x < upper."""
    values = ChannelClip(upper, dim)(x)
    # compared in the compute type (float32 for half inputs), as the op's kernels compare
    passes = (x > 0) & (x < bounds_view(upper.to(torch.promote_types(x.dtype, torch.float32)), x.shape, dim))
    return values, torch.where(passes, grad, torch.zeros_like(grad))


def activation(shape, dim, dtype, device, seed):
    """Gaussian values around the bounds, with exact zeros, exact bounds (ties) and one NaN."""
    g = torch.Generator().manual_seed(seed)
    upper = torch.rand(shape[dim], generator=g) * 3 + 0.25
    x = torch.randn(shape, generator=g) * 2.5
    flat = x.view(-1)
    if flat.numel() >= 3:
        flat[0] = 0.0
        flat[1] = float("nan")
        index = [0] * len(shape)
        index[dim] = shape[dim] - 1
        x[tuple(index)] = upper[-1]  # an element exactly at its channel's bound
    return x.to(dtype).to(device), upper.to(device)


def laid_out(x, layout):
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # dense in reversed dimension order
        return x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    if layout == "strided":  # not dense: every other element of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, dim, layout", [
    ((4, 24, 5, 5), 1, "contiguous"), ((4, 24, 5, 5), 1, "channels_last"), ((3, 7, 2, 9), 1, "channels_last"),
    ((3, 7, 2, 9), 1, "strided"), ((6, 40), -1, "contiguous"), ((2, 5, 33), -1, "permuted"), ((5, 1, 4, 4), 1,
                                                                                             "channels_last")])
def test_values_and_gradient_equal_the_channel_clip_and_its_threshold_masks(device, dtype, shape, dim, layout):
    """Bit for bit, ties at 0 and at the bound (no gradient), a NaN kept; the output laid out as a
    dense input, contiguous for another."""
    x, upper = activation(shape, dim, dtype, device, seed=len(shape) * 10 + shape[-1])
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    grad[(0,) * len(shape)] = float("inf")  # where x = 0: the clip passes nothing, not inf * 0 = NaN
    x, grad = laid_out(x, layout), laid_out(grad, layout)
    want_values, want_grad = reference(x, upper, dim, grad)
    a = x.clone().requires_grad_()
    out = channel_clip(a, upper, dim)
    assert out.dtype == dtype and torch.equal(out.isnan(), want_values.isnan())
    assert torch.equal(out.nan_to_num(), want_values.nan_to_num())
    assert out.stride() == (x.contiguous().stride() if layout == "strided" else x.stride())
    out.backward(grad)
    assert torch.equal(a.grad, want_grad)
    assert torch.equal(ops.channel_clip_backward(grad, x, upper, dim), want_grad)


@st.composite
def clip_args(draw):
    """Any rank from 1 to 4, sizes 0 to 6, any channel dimension, a permuted dense layout or a strided one."""
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    order = draw(st.permutations(range(len(shape))))
    strided = draw(st.booleans())
    return shape, dim, order, strided, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(clip_args())
def test_any_shape_layout_and_channel_dimension(args):
    shape, dim, order, strided, seed = args
    g = torch.Generator().manual_seed(seed)
    upper = torch.rand(shape[dim], generator=g) * 2
    base = torch.randn([shape[i] for i in order], generator=g) * 2
    inverse = [order.index(i) for i in range(len(shape))]
    x = base.permute(*inverse)  # dense, dimensions in memory in `order`
    if strided and x.dim() and x.shape[-1] > 1:
        x = x[..., ::2]
        upper = upper if dim % len(shape) != len(shape) - 1 else upper[::2].contiguous()
    grad = torch.randn(x.shape, generator=g)
    want_values, want_grad = reference(x, upper, dim, grad)
    assert torch.equal(ops.channel_clip(x, upper, dim), want_values)
    assert torch.equal(ops.channel_clip_backward(grad, x, upper, dim), want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_emulated_cuda_kernels_equal_the_cpu_kernels(dtype):
    x, upper = activation((8, 48, 6, 6), 1, dtype, "cpu", seed=3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for emulate in (False, True):
        _C.set_cuda_emulation(emulate)
        try:
            results.append([f(t) for t in (x, x.contiguous(memory_format=torch.channels_last)) for f in (
                lambda t: ops.channel_clip(t, upper, 1), lambda t: ops.channel_clip_backward(grad, t, upper, 1))])
        finally:
            _C.set_cuda_emulation(False)
    for cpu, emulated in zip(*results):
        assert torch.equal(cpu.nan_to_num(), emulated.nan_to_num()) and cpu.stride() == emulated.stride()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_kernels_equal_the_cpu_kernels(dtype):
    """On a GPU: values and gradient bit for bit, NCHW and NHWC (the sanitizer runs this one)."""
    x, upper = activation((8, 48, 6, 6), 1, dtype, "cpu", seed=5)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        for f in (lambda a, u: ops.channel_clip(a, u, 1), lambda a, u: ops.channel_clip_backward(grad.to(a.device), a, u,
                                                                                              1)):
            cpu, gpu = f(t, upper), f(t.cuda(), upper.cuda()).cpu()
            assert torch.equal(cpu.nan_to_num(), gpu.nan_to_num()) and torch.equal(cpu.isnan(), gpu.isnan())
            assert gpu.stride() == cpu.stride()


def test_gradcheck_and_opcheck(device):
    g = torch.Generator().manual_seed(6)
    upper = (torch.rand(5, generator=g) + 0.5).to(device)
    x = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64) * 2
    x = torch.where((x.abs() < 0.05) | ((x - bounds_view(upper.cpu().double(), x.shape, 1)).abs() < 0.05), x + 0.1, x)
    x = x.to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: channel_clip(t, upper, 1), (x,))
    for args in [(x, upper, 1), (x.detach().float().contiguous(memory_format=torch.channels_last), upper, 1),
                 (torch.randn(6, 5, device=device).requires_grad_(), upper, -1)]:
        torch.library.opcheck(ops.channel_clip.default, args)
    torch.library.opcheck(ops.channel_clip_backward.default, (torch.randn_like(x), x.detach(), upper, 1))


def test_autograd_records_nothing_without_an_input_gradient_and_refuses_a_learnable_bound(device):
    x = torch.randn(2, 3, device=device)
    upper = torch.ones(3, device=device)
    assert channel_clip(x, upper, -1).grad_fn is None
    with pytest.raises(RuntimeError, match="upper must not require grad"):
        channel_clip(x.requires_grad_(), upper.requires_grad_(), -1)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.channel_clip(torch.ones(2, 3, dtype=torch.int32), torch.ones(3), 1), "input must be a floating"),
    (lambda: ops.channel_clip(torch.ones(2, 3), torch.ones(2), 1), r"upper must hold one bound per channel \(3"),
    (lambda: ops.channel_clip(torch.ones(2, 3), torch.ones(3, dtype=torch.int64), 1), "upper must be a floating"),
    (lambda: ops.channel_clip(torch.ones(2, 3), torch.ones(3), 2), "dim 2 is out of range"),
    (lambda: ops.channel_clip(torch.ones(()), torch.ones(1), 0), "input must have a channel dimension"),
    (lambda: ops.channel_clip(torch.ones(2, 3), torch.tensor([1.0, float("nan"), 1.0]), 1),
     "upper must hold no NaN and no negative bound, got nan for channel 1"),
    (lambda: ops.channel_clip(torch.ones(2, 3), torch.tensor([1.0, 1.0, -0.5]), 1), "for channel 2"),
    (lambda: ops.channel_clip_backward(torch.ones(3, 2), torch.ones(2, 3), torch.ones(3), 1),
     "grad_output must have the shape of input"),
    (lambda: ops.channel_clip_backward(torch.ones(2, 3).double(), torch.ones(2, 3), torch.ones(3), 1),
     "grad_output must be Float as input"),
    (lambda: ops.channel_clip(torch.ones(2, 3), torch.ones(3, device="meta"), 1), "upper is on meta"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
