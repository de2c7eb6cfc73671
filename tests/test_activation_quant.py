"""torch.ops.adaround.fake_quantize_activation (block reconstruction's input quantizers) against
PyTorch's own fake quantization, its learnable (LSQ) variant, relu/relu6/hardtanh composed in front,
torch.where for QDrop, and opcheck; on the CPU kernels, the emulated CUDA kernels and a GPU."""
import pytest
import torch
import torch.nn.functional as F

from adaround_ext import _C
from adaround_ext._ops import fake_quantize_activation
from conftest import needs_cuda

ops = torch.ops.adaround
CLAMPS = {"relu": ((0.0, None), F.relu), "relu6": ((0.0, 6.0), F.relu6),
          "hardtanh": ((-1.0, 2.0), lambda x: F.hardtanh(x, -1.0, 2.0))}


def activations(n, dtype, device, seed=3, spread=0.8, scale=0.125, zero_point=3, qmin=0, qmax=15):
    """Gaussian values, then every half code of the grid (and beyond both ends) exactly: ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * spread
    ties = (torch.arange(qmin - 6, qmax + 1, dtype=torch.float64) + 0.5 - zero_point) * scale
    return torch.cat([x, ties]).to(dtype).to(device)


def grid(scale, zero_point, device):
    return torch.tensor([scale], device=device), torch.tensor([float(zero_point)], device=device)


@pytest.mark.parametrize("scale", [0.0731, 0.125])  # 0.125: exact ties at every half code
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_values_and_input_gradient_equal_torchs(device, dtype, scale):
    """Bit for bit, with ties (rounded to even), both clipped ends and a nonzero zero point."""
    zero_point, qmin, qmax = 3, 0, 15
    x = activations(4000, dtype, device, scale=scale).requires_grad_()
    ours = fake_quantize_activation(x, *grid(scale, zero_point, device), qmin, qmax)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    if scale == 0.125:  # x / scale lands on k + 1/2 exactly: to the even neighbour (-2.5 -> -2, -1.5 -> -2)
        halves = torch.arange(qmin - 6, qmax + 1, dtype=torch.float64) + 0.5 - zero_point
        even = torch.where(torch.floor(halves) % 2 == 0, torch.floor(halves), torch.ceil(halves))
        expected_codes = (even + zero_point).clamp(qmin, qmax) - zero_point
        assert torch.equal(ours[-len(halves):].double().cpu() / scale, expected_codes)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype).to(device)
    expected = torch.autograd.grad(theirs, x, grad)[0]
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], expected)
    assert 0 < (expected == 0).sum() < len(x)  # some elements fall outside the grid


def test_nan_stays_nan_and_infinities_clip(device):
    x = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")], device=device, requires_grad=True)
    out = fake_quantize_activation(x, *grid(0.25, 2, device), 0, 15)
    assert out[0].isnan()
    assert out[1:].tolist() == [1.0, (15 - 2) * 0.25, (0 - 2) * 0.25]
    (grad,) = torch.autograd.grad(out[1:].sum(), x)
    assert grad[1:].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_any_layout_gives_the_contiguous_result_in_the_inputs_layout(device, layout):
    x = torch.randn(3, 8, 5, 4, device=device) * 2
    keep = torch.rand(x.shape, device=device) < 0.3
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x_in = torch.randn(3, 8, 5, 8, device=device)[..., ::2]
        x_in.copy_(x)
    else:
        x_in = x
    args = (*grid(0.2, 4, device), 0, 15, 0.0, 6.0)
    out = fake_quantize_activation(x_in, *args, keep.contiguous(memory_format=torch.channels_last))
    assert torch.equal(out, fake_quantize_activation(x, *args, keep))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)  # not copied to NCHW


def test_step_gradient_equals_torchs_learnable_fake_quantization(device):
    """LSQ's gradient for the step (Esser et al. 2020) as torch's learnable fake quantization
    computes it, and the same input gradient; elements clip at both ends."""
    x = activations(5000, torch.float32, device, spread=1.5, scale=0.14)  # no exact ties: see the QDrop test
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)
    scale, zero_point = grid(0.13, 5, device)
    results = []
    for fn in (lambda a, s: fake_quantize_activation(a, s, zero_point, 0, 15),
               lambda a, s: torch._fake_quantize_learnable_per_tensor_affine(a, s, zero_point, 0, 15, 1.0)):
        a, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
        (weights * fn(a, s)).sum().backward()
        results.append((a.grad, s.grad))
    (ours_x, ours_s), (theirs_x, theirs_s) = results
    assert torch.equal(ours_x, theirs_x)
    # (level - x / s) against torch's (x_fq - x) / s: the same quantity rounded in another order.
    torch.testing.assert_close(ours_s, theirs_s, rtol=1e-5, atol=1e-4)
    assert ours_s.shape == scale.shape


@pytest.mark.parametrize("clamp", list(CLAMPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fused_clamp_equals_the_activation_then_fake_quantization(device, clamp, dtype):
    """Values and input gradient bit for bit, the step gradient as the learnable quantizer's on the
    clamped input; x at the clamp's bounds exactly (hardtanh's backward passes neither bound)."""
    (lower, upper), activation = CLAMPS[clamp]
    x = activations(3000, dtype, device, spread=4.0, scale=0.25, zero_point=4)
    x = torch.cat([x, torch.tensor([lower, upper if upper is not None else 100.0], dtype=dtype, device=device)])
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=dtype).to(device)
    scale, zero_point = grid(0.25, 4, device)
    a, s_ours = x.clone().requires_grad_(), scale.clone().requires_grad_()
    ours = fake_quantize_activation(a, s_ours, zero_point, 0, 15, lower, upper)
    (weights * ours).sum().backward()
    b = x.clone().requires_grad_()
    theirs = torch.fake_quantize_per_tensor_affine(activation(b), 0.25, 4, 0, 15)
    (weights * theirs).sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(a.grad, b.grad)
    s = scale.clone().requires_grad_()
    lsq = torch._fake_quantize_learnable_per_tensor_affine(activation(x).float(), s, zero_point, 0, 15, 1.0)
    (weights.float() * lsq).sum().backward()
    torch.testing.assert_close(s_ours.grad, s.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("clamped", [False, True])
def test_kept_elements_pass_in_float_and_give_the_step_no_gradient(device, clamped):
    """QDrop: where keep_float holds, the (clamped) input itself, as torch.where(keep, x, fake_quant(x))."""
    # No exact ties: there torch's learnable quantizer rounds x / s + z where its plain one (and ours)
    # rounds x / s and adds z, which differ for an odd zero point.
    x = activations(4000, torch.float32, device, spread=3.0, scale=0.13)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)).to(device) < 0.5
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(device)
    scale, zero_point = grid(0.125, 3, device)
    bounds = (0.0, 6.0) if clamped else (None, None)
    a, s_ours = x.clone().requires_grad_(), scale.clone().requires_grad_()
    ours = fake_quantize_activation(a, s_ours, zero_point, 0, 15, *bounds, keep)
    (weights * ours).sum().backward()
    b, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = F.relu6(b) if clamped else b
    theirs = torch.where(keep, y, torch._fake_quantize_learnable_per_tensor_affine(y, s, zero_point, 0, 15, 1.0))
    (weights * theirs).sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(a.grad, b.grad)
    torch.testing.assert_close(s_ours.grad, s.grad, rtol=1e-5, atol=1e-4)
    all_kept = fake_quantize_activation(x, scale, zero_point, 0, 15, *bounds, torch.ones_like(keep))
    assert torch.equal(all_kept, F.relu6(x) if clamped else x)


def test_opcheck(device):
    x = torch.randn(2, 5, 3, 3, device=device) * 2
    scale, zero_point = grid(0.1, 7, device)
    keep = torch.rand(x.shape, device=device) < 0.4
    xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
    for args in [(xg, sg, zero_point, 0, 15, None, None, None), (xg, scale, zero_point, 0, 15, 0.0, 6.0, keep),
                 (x.double().requires_grad_(), sg, zero_point, 0, 15, 0.0, None, keep),
                 (x.contiguous(memory_format=torch.channels_last), scale, zero_point, 0, 255, None, None, None)]:
        torch.library.opcheck(ops.fake_quantize_activation.default, args)
    torch.library.opcheck(ops.fake_quantize_activation_backward.default,
                          (torch.randn_like(x), x, scale, zero_point, 0, 15, 0.0, 6.0, keep, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_emulated_cuda_kernels_equal_the_cpu_kernels(dtype):
    """Values and input gradient bit for bit (the same formulas on both sides), the step gradient to
    the order of its sum."""
    x = activations(20000, dtype, "cpu", spread=3.0)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) < 0.3
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(dtype)
    scale, zero_point = grid(0.125, 3, "cpu")
    results = []
    for emulate in (False, True):
        _C.set_cuda_emulation(emulate)
        try:
            out = ops.fake_quantize_activation(x, scale, zero_point, 0, 15, 0.0, 6.0, keep)
            grads = ops.fake_quantize_activation_backward(grad, x, scale, zero_point, 0, 15, 0.0, 6.0, keep, True)
        finally:
            _C.set_cuda_emulation(False)
        results.append((out, *grads))
    (cpu_out, cpu_gx, cpu_gs), (emu_out, emu_gx, emu_gs) = results
    assert torch.equal(cpu_out, emu_out) and torch.equal(cpu_gx, emu_gx)
    torch.testing.assert_close(emu_gs, cpu_gs, rtol=1e-6, atol=1e-6)


def test_without_scale_grad_the_step_gradient_is_zero(device):
    x = torch.randn(100, device=device) * 3
    scale, zero_point = grid(0.1, 0, device)
    _, grad_scale = ops.fake_quantize_activation_backward(torch.ones_like(x), x, scale, zero_point, -8, 7,
                                                          None, None, None, False)
    assert grad_scale.tolist() == [0.0]


def bad_call(**changes):
    args = dict(input=torch.randn(4, 3), scale=torch.tensor([0.1]), zero_point=torch.tensor([2.0]), quant_min=0,
                quant_max=15, clamp_min=None, clamp_max=None, keep_float=None)
    args.update(changes)
    return lambda: ops.fake_quantize_activation(*args.values())


@pytest.mark.parametrize("changes, message", [
    (dict(input=torch.ones(4, 3, dtype=torch.int32)), "input must be a floating-point"),
    (dict(scale=torch.tensor([0.1, 0.2])), "scale must have one element"),
    (dict(scale=torch.tensor([1], dtype=torch.int64)), "scale must be a floating-point"),
    (dict(scale=torch.tensor([0.0])), "scale must be positive and finite"),
    (dict(scale=torch.tensor([float("nan")])), "scale must be positive and finite"),
    (dict(zero_point=torch.tensor([2.5])), "zero_point must be an integer inside"),
    (dict(zero_point=torch.tensor([16.0])), "zero_point must be an integer inside"),
    (dict(zero_point=torch.tensor([1.0, 2.0])), "zero_point must have one element"),
    (dict(quant_min=15, quant_max=0), "quant_min"),
    (dict(quant_max=1000), "quant_min/quant_max"),
    (dict(clamp_min=6.0, clamp_max=0.0), "clamp_min"),
    (dict(clamp_min=float("nan")), "must not be NaN"),
    (dict(keep_float=torch.ones(4, 3)), "keep_float must be a bool tensor"),
    (dict(keep_float=torch.ones(3, 4, dtype=torch.bool)), "keep_float must have the shape of input"),
    (dict(scale=torch.tensor([0.1], device="meta")), "scale is on meta"),
])
def test_bad_arguments_are_named(changes, message):
    with pytest.raises(RuntimeError, match=message):
        bad_call(**changes)()


@pytest.mark.parametrize("grad_output, message", [
    (torch.ones(3, 4), "grad_output must have the shape of input"),
    (torch.ones(4, 3, dtype=torch.float64), "grad_output must be"),
])
def test_bad_backward_arguments_are_named(grad_output, message):
    with pytest.raises(RuntimeError, match=message):
        ops.fake_quantize_activation_backward(grad_output, torch.randn(4, 3), torch.tensor([0.1]),
                                              torch.tensor([2.0]), 0, 15, None, None, None, True)


@needs_cuda
def test_cuda_kernels_equal_the_cpu_kernels_and_need_no_synchronisation():
    """The same values and input gradient as the CPU kernels; the learned step stays on the GPU."""
    x = activations(100000, torch.float32, "cpu", spread=3.0)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(11)) < 0.3
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    scale, zero_point = grid(0.125, 3, "cpu")
    results = []
    for device in ("cpu", "cuda"):
        on = lambda t: t.to(device)
        out = ops.fake_quantize_activation(on(x), on(scale), on(zero_point), 0, 15, 0.0, 6.0, on(keep))
        gx, gs = ops.fake_quantize_activation_backward(on(grad), on(x), on(scale), on(zero_point), 0, 15, 0.0, 6.0,
                                                       on(keep), True)
        assert gs.device.type == device
        results.append((out.cpu(), gx.cpu(), gs.cpu()))
    (cpu_out, cpu_gx, cpu_gs), (gpu_out, gpu_gx, gpu_gs) = results
    assert torch.equal(cpu_out, gpu_out) and torch.equal(cpu_gx, gpu_gx)
    torch.testing.assert_close(gpu_gs, cpu_gs, rtol=1e-6, atol=1e-5)
