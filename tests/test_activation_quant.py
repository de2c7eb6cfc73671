"""torch.ops.adaround.fake_quantize_activation (block reconstruction's input quantizers) against
PyTorch's own fake quantization, its learnable (LSQ) variant, relu/relu6/hardtanh composed in front,
torch.where over QDrop's draws (written out below), and opcheck; on the CPU kernels, the emulated CUDA
kernels and a GPU."""
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


def qdrop_keeps(n, probability, seed):
    """Which of n elements (by position in memory) the op keeps in float, with Python integers:
    lowbias32 of position ^ key below round(probability * 2^32), key from the seed's two halves."""
    mask = 2**32 - 1

    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    seed &= 2**64 - 1
    key = mix32((seed & mask) ^ mix32(seed >> 32))
    threshold = round(probability * 2**32)
    return torch.tensor([mix32(i ^ key) < threshold for i in range(n)])


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
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x_in = torch.randn(3, 8, 5, 8, device=device)[..., ::2]
        x_in.copy_(x)
    else:
        x_in = x
    args = (*grid(0.2, 4, device), 0, 15, 0.0, 6.0)
    out = fake_quantize_activation(x_in, *args)
    assert torch.equal(out, fake_quantize_activation(x, *args))
    grad = torch.randn_like(x)  # contiguous, whatever the input's layout: laid out as the input inside
    for g in (grad, grad.contiguous(memory_format=torch.channels_last), grad[:1].expand_as(grad)):
        expected = ops.fake_quantize_activation_backward(g.contiguous(), x, *args, 0.0, 0, True)
        got = ops.fake_quantize_activation_backward(g, x_in, *args, 0.0, 0, True)
        assert torch.equal(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)  # not copied to NCHW
        # QDrop draws by position in memory: as for the same memory seen as a contiguous NHWC tensor.
        nhwc = x_in.permute(0, 2, 3, 1)
        dropped = fake_quantize_activation(x_in, *args, 0.5, 9)
        assert torch.equal(dropped.permute(0, 2, 3, 1), fake_quantize_activation(nhwc.contiguous(), *args, 0.5, 9))


def test_empty_and_zero_dim_inputs(device):
    scale, zero_point = grid(0.5, 0, device)
    for x in (torch.empty(0, 3, device=device), torch.tensor(1.3, device=device)):
        x.requires_grad_()
        s = scale.clone().requires_grad_()
        out = fake_quantize_activation(x, s, zero_point, -8, 7)
        assert out.shape == x.shape
        assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, 0.5, 0, -8, 7))
        out.sum().backward()
        assert s.grad.shape == scale.shape and x.grad.shape == x.shape


def test_the_step_gradient_does_not_depend_on_the_thread_count():
    x = torch.randn(100_000) * 3
    grad = torch.randn_like(x)
    scale, zero_point = grid(0.1, 3, "cpu")
    scale = scale.double()  # the step gradient keeps the double sum: a float32 one would hide its order
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.fake_quantize_activation_backward(grad, x, scale, zero_point, 0, 15, None, None,
                                                                 0.0, 0, True)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clamp_bounds_are_compared_in_the_compute_type(device, dtype):
    """As hardtanh's backward compares them: -0.1 and 0.1 are not half values, and the inputs at their
    half roundings lie inside the float bounds, so they pass the gradient there too."""
    x = torch.tensor([-0.1, 0.1, -0.2, 0.05, 0.3], dtype=dtype, device=device).requires_grad_()
    y = x.detach().clone().requires_grad_()
    ours = fake_quantize_activation(x, *grid(0.01, 10, device), 0, 255, -0.1, 0.1)
    theirs = torch.fake_quantize_per_tensor_affine(F.hardtanh(y, -0.1, 0.1), 0.01, 10, 0, 255)
    assert torch.equal(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.equal(x.grad, y.grad)


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
    """QDrop: where an element is drawn (qdrop_keeps), the (clamped) input itself, as
    torch.where(keep, x, fake_quant(x)); probability 1 keeps all, 0 none."""
    # No exact ties: there torch's learnable quantizer rounds x / s + z where its plain one (and ours)
    # rounds x / s and adds z, which differ for an odd zero point.
    x = activations(4000, torch.float32, device, spread=3.0, scale=0.13)
    keep = qdrop_keeps(len(x), 0.5, seed=7).to(device)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(device)
    scale, zero_point = grid(0.125, 3, device)
    bounds = (0.0, 6.0) if clamped else (None, None)
    a, s_ours = x.clone().requires_grad_(), scale.clone().requires_grad_()
    ours = fake_quantize_activation(a, s_ours, zero_point, 0, 15, *bounds, 0.5, 7)
    (weights * ours).sum().backward()
    b, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = F.relu6(b) if clamped else b
    theirs = torch.where(keep, y, torch._fake_quantize_learnable_per_tensor_affine(y, s, zero_point, 0, 15, 1.0))
    (weights * theirs).sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(a.grad, b.grad)
    torch.testing.assert_close(s_ours.grad, s.grad, rtol=1e-5, atol=1e-4)
    all_kept = fake_quantize_activation(x, scale, zero_point, 0, 15, *bounds, 1.0, 7)
    assert torch.equal(all_kept, F.relu6(x) if clamped else x)
    assert torch.equal(fake_quantize_activation(x, scale, zero_point, 0, 15, *bounds, 0.0, 7),
                       fake_quantize_activation(x, scale, zero_point, 0, 15, *bounds))


@pytest.mark.parametrize("probability", [0.1, 0.5, 0.9])
def test_qdrop_keeps_the_given_share_in_a_new_draw_per_seed(device, probability):
    x = torch.randn(64, 100, device=device) * 3
    scale, zero_point = grid(0.05, 128, device)
    quantized = fake_quantize_activation(x, scale, zero_point, 0, 255)
    kept = []
    for seed in (1, 2, -3, 2**40 + 1):
        out = fake_quantize_activation(x, scale, zero_point, 0, 255, None, None, probability, seed)
        kept.append((out == x) & (quantized != x))
        assert torch.equal(out[~kept[-1]], quantized[~kept[-1]])
        assert kept[-1].float().mean().item() == pytest.approx(probability * (quantized != x).float().mean().item(),
                                                               abs=0.03)
    assert all(not torch.equal(a, b) for i, a in enumerate(kept) for b in kept[i + 1:])


def test_opcheck(device):
    x = torch.randn(2, 5, 3, 3, device=device) * 2
    scale, zero_point = grid(0.1, 7, device)
    xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
    for args in [(xg, sg, zero_point, 0, 15, None, None, 0.0, 0), (xg, scale, zero_point, 0, 15, 0.0, 6.0, 0.4, 5),
                 (x.double().requires_grad_(), sg, zero_point, 0, 15, 0.0, None, 0.4, -5),
                 (x.contiguous(memory_format=torch.channels_last), scale, zero_point, 0, 255, None, None, 0.0, 0),
                 (torch.randn(2, 5, 3, 6, device=device)[..., ::2], scale, zero_point, 0, 15, None, None, 0.0, 0)]:
        torch.library.opcheck(ops.fake_quantize_activation.default, args)
    torch.library.opcheck(ops.fake_quantize_activation_backward.default,
                          (torch.randn_like(x), x, scale, zero_point, 0, 15, 0.0, 6.0, 0.4, 5, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_emulated_cuda_kernels_equal_the_cpu_kernels(dtype):
    """Values and input gradient bit for bit (the same formulas on both sides), the step gradient to
    the order of its sum."""
    x = activations(20000, dtype, "cpu", spread=3.0)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(dtype)
    scale, zero_point = grid(0.125, 3, "cpu")
    results = []
    for emulate in (False, True):
        _C.set_cuda_emulation(emulate)
        try:
            out = ops.fake_quantize_activation(x, scale, zero_point, 0, 15, 0.0, 6.0, 0.3, 9)
            grads = ops.fake_quantize_activation_backward(grad, x, scale, zero_point, 0, 15, 0.0, 6.0, 0.3, 9, True)
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
                                                          None, None, 0.0, 0, False)
    assert grad_scale.tolist() == [0.0]


@pytest.mark.parametrize("wants", ["input", "scale", "both", "neither"])
def test_autograd_returns_the_backward_ops_gradient_for_each_input_that_requires_one(device, wants):
    """The op's autograd (csrc/activation_autograd.cpp) hands on the backward op's gradients, for the
    forward's clamp and QDrop draws, to the input and the step that require them, and records nothing
    where neither does."""
    x = activations(500, torch.float32, device, spread=3.0, scale=0.13)
    scale, zero_point = grid(0.125, 3, device)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(device)
    grid_clamp_draw = (zero_point, 0, 15, 0.0, 6.0, 0.5, 11)
    expected_input, expected_scale = ops.fake_quantize_activation_backward(g, x, scale, *grid_clamp_draw, True)
    a = x.clone().requires_grad_(wants in ("input", "both"))
    s = scale.clone().requires_grad_(wants in ("scale", "both"))
    out = fake_quantize_activation(a, s, *grid_clamp_draw)
    assert torch.equal(out, ops.fake_quantize_activation(x, scale, *grid_clamp_draw))
    if wants == "neither":
        assert out.grad_fn is None
        return
    out.backward(g)
    assert (a.grad is not None) == (wants != "scale") and (s.grad is not None) == (wants != "input")
    if a.grad is not None:
        assert torch.equal(a.grad, expected_input)
    if s.grad is not None:
        assert torch.equal(s.grad, expected_scale)


def bad_call(**changes):
    args = dict(input=torch.randn(4, 3), scale=torch.tensor([0.1]), zero_point=torch.tensor([2.0]), quant_min=0,
                quant_max=15, clamp_min=None, clamp_max=None, drop_probability=0.0, drop_seed=0)
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
    (dict(drop_probability=1.5), r"drop_probability must lie in \[0, 1\]"),
    (dict(drop_probability=float("nan")), r"drop_probability must lie in \[0, 1\]"),
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
                                              torch.tensor([2.0]), 0, 15, None, None, 0.0, 0, True)


@needs_cuda
def test_cuda_kernels_equal_the_cpu_kernels_and_need_no_synchronisation():
    """The same values and input gradient as the CPU kernels; the learned step stays on the GPU."""
    x = activations(100000 - 22, torch.float32, "cpu", spread=3.0)  # and 22 ties: 10^5 in all
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    scale, zero_point = grid(0.125, 3, "cpu")
    results = []
    for device in ("cpu", "cuda"):
        xd, gd, sd, zd = (t.to(device) for t in (x, grad, scale, zero_point))
        for channels_last in (False, True):  # the same memory order: the same draws
            if channels_last:
                xd, gd = (t.view(10, 10, 10, 100).contiguous(memory_format=torch.channels_last) for t in (xd, gd))
            torch.cuda.set_sync_debug_mode("error" if device == "cuda" else "default")
            try:
                out = ops.fake_quantize_activation(xd, sd, zd, 0, 15, 0.0, 6.0, 0.3, 11)
                gx, gs = ops.fake_quantize_activation_backward(gd, xd, sd, zd, 0, 15, 0.0, 6.0, 0.3, 11, True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert gs.device.type == device
            results.append((out.cpu(), gx.cpu(), gs.cpu()))
    for cpu, gpu in zip(results[:2], results[2:]):
        assert torch.equal(cpu[0], gpu[0]) and torch.equal(cpu[1], gpu[1])
        torch.testing.assert_close(gpu[2], cpu[2], rtol=1e-6, atol=1e-5)
