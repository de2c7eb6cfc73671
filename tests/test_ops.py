"""The rounding ops against plain-PyTorch formulas, gradcheck, opcheck and torch.compile."""
import pytest
import torch

import adaround_ext as ae
from adaround_testbed import reference as ref
from conftest import needs_cuda

ops = torch.ops.adaround

# (bits, symmetric, axis) combinations over a conv weight [out, in, kh, kw]
GRIDS = [(4, True, None), (4, True, 0), (2, True, 1), (8, False, 0), (3, False, -1), (4, True, 3)]


def make_grid(w, bits, symmetric, axis):
    n, p = ae.quant_range(bits, symmetric)
    if axis is None:
        lo, hi = w.min(), w.max()
    else:
        dims = [d for d in range(w.dim()) if d != axis % w.dim()]
        lo, hi = w.amin(dim=dims), w.amax(dim=dims)
    if symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()).float() / p
        zero_point = None
    else:
        scale = (hi - lo).float() / (p - n)
        zero_point = torch.round(-lo.float() / scale).clamp(n, p)
    return scale.reshape(-1) if axis is not None else scale.reshape(()), zero_point, n, p


def weight(device, dtype=torch.float32, shape=(8, 6, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def rand_v(w, seed=1, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    return (torch.randn(w.shape, generator=g, dtype=dtype) * spread).to(w.device)


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric,axis", GRIDS)
def test_soft_quantize_matches_formula(device, dtype, bits, symmetric, axis):
    w = weight(device, dtype)
    scale, zp, n, p = make_grid(w.float(), bits, symmetric, axis)
    scale = scale.to(torch.float64) if dtype == torch.float64 else scale
    v = rand_v(w)
    out = ae.soft_quantize(w, v, scale, zp, n, p, axis)
    expected = ref.soft_quantize(w, v, scale, zp, n, p, axis)
    assert out.dtype == dtype and out.shape == w.shape
    # Half types store the float result rounded to their precision.
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("bits,symmetric,axis", GRIDS)
def test_soft_quantize_backward_matches_autograd(device, bits, symmetric, axis):
    w = weight(device)
    scale, zp, n, p = make_grid(w, bits, symmetric, axis)
    v1 = rand_v(w).requires_grad_(True)
    v2 = v1.detach().clone().requires_grad_(True)
    g = torch.randn_like(w)
    (ae.soft_quantize(w, v1, scale, zp, n, p, axis) * g).sum().backward()
    (ref.soft_quantize(w, v2, scale, zp, n, p, axis) * g).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-6)
    assert (v1.grad == 0).any() and (v1.grad != 0).any()  # both clipped and live elements exercised


@pytest.mark.parametrize("axis", [None, 0])
def test_soft_quantize_gradcheck(device, axis):
    w = weight(device, torch.float64, shape=(4, 3, 2, 2))
    scale, zp, n, p = make_grid(w, 3, False, axis)
    v = rand_v(w, spread=1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v_: ae.soft_quantize(w, v_, scale.double(), zp, n, p, axis), (v,))


@pytest.mark.parametrize("beta", [1.0, 2.0, 7.5, 20.0])
def test_round_regularizer_matches_formula(device, beta):
    v = rand_v(weight(device, shape=(1000,)))
    v1 = v.clone().requires_grad_(True)
    v2 = v.clone().requires_grad_(True)
    value = ae.round_regularizer(v1, beta)
    expected = ref.regularizer(v2, beta)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-4)
    value.backward()
    expected.backward()
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-4, atol=1e-6)


def test_round_regularizer_gradcheck(device):
    v = rand_v(weight(device, torch.float64, shape=(50,)), spread=1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v_: ae.round_regularizer(v_, 3.0), (v,))


def test_round_regularizer_is_the_same_on_any_thread_count():
    """The CPU sum runs over fixed chunks added in order, not per thread: 1, 2 and 3 threads give
    the same value bit for bit (float64, where a float32 result would hide the order of the sum)."""
    v = torch.randn(300_001, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    threads = torch.get_num_threads()
    values = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            values.append(ae.round_regularizer(v, 4.0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])


def test_regularizer_saturates_at_decided_values(device):
    # h(V) = 0 or 1 exactly where V is far from 0: those elements add nothing and get no gradient.
    v = torch.tensor([-10.0, 10.0, 0.0], device=device, requires_grad=True)
    value = ae.round_regularizer(v, 2.0)
    value.backward()
    assert value.item() == pytest.approx(1.0)
    assert v.grad.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["nearest", "floor", "ceil", "adaptive", "stochastic"])
@pytest.mark.parametrize("bits,symmetric,axis", GRIDS)
def test_hard_quantize_matches_formula(device, mode, bits, symmetric, axis):
    w = weight(device)
    scale, zp, n, p = make_grid(w, bits, symmetric, axis)
    v = rand_v(w) if mode == "adaptive" else None
    noise = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)).to(device) if mode == "stochastic" else None
    codes, deq = ae.hard_quantize(w, scale, zp, n, p, axis, mode, v=v, noise=noise)
    exp_codes, exp_deq = ref.hard_quantize(w, scale, zp, n, p, axis, mode, v=v, noise=noise)
    assert codes.dtype == (torch.int8 if n >= -128 and p <= 127 else torch.uint8)
    assert torch.equal(codes.long(), exp_codes.long())
    torch.testing.assert_close(deq, exp_deq)
    assert codes.min() >= n and codes.max() <= p


def test_adaptive_rounding_tie_at_one_half(device):
    # h(0) = 0.5 exactly: adaptive rounding rounds up there (floor + [h >= 0.5]).
    w = torch.tensor([0.25, 1.75], device=device)
    v = torch.zeros(2, device=device)
    codes, _ = ae.hard_quantize(w, torch.tensor(1.0, device=device), None, -8, 7, None, "adaptive", v=v)
    assert codes.tolist() == [1, 2]


def test_stochastic_rounding_frequency_and_seed(device):
    w = torch.full((20000,), 0.3, device=device)
    scale = torch.tensor(1.0, device=device)
    gen = torch.Generator(device=device).manual_seed(7)
    codes, _ = ae.hard_quantize(w, scale, None, -8, 7, None, "stochastic", generator=gen)
    assert codes.float().mean().item() == pytest.approx(0.3, abs=0.015)
    again, _ = ae.hard_quantize(w, scale, None, -8, 7, None, "stochastic",
                                generator=torch.Generator(device=device).manual_seed(7))
    assert torch.equal(codes, again)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_init_v_reproduces_weights_inside_grid(device, axis):
    w = weight(device)
    scale, zp, n, p = make_grid(w, 4, True, axis)
    v = ae.init_v(w, scale, axis)
    torch.testing.assert_close(v, ref.init_v(w, scale, axis), rtol=1e-5, atol=1e-5)
    x = w / ref.broadcast(scale, w, axis)
    torch.testing.assert_close(ref.h(v), x - torch.floor(x), rtol=0, atol=1e-5)
    soft = ae.soft_quantize(w, v, scale, zp, n, p, axis)
    inside = (torch.floor(x) + 1 <= p) & (x >= n)
    torch.testing.assert_close(soft[inside], w[inside], rtol=0, atol=1e-5)


def test_empty_tensors(device):
    w = torch.empty(0, 3, device=device)
    scale = torch.ones(0, device=device)
    v = torch.empty(0, 3, device=device)
    assert ae.soft_quantize(w, v, scale, None, -8, 7, 0).shape == (0, 3)
    assert ae.round_regularizer(v, 2.0).item() == 0.0
    codes, deq = ae.hard_quantize(w, scale, None, -8, 7, 0)
    assert codes.shape == deq.shape == (0, 3)
    assert ae.init_v(w, scale, 0).shape == (0, 3)


def _sample_args(device):
    w = weight(device, shape=(4, 3, 3, 3))
    scale, zp, n, p = make_grid(w, 4, False, 0)
    v = rand_v(w)
    return w, v, scale, zp, n, p


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_reconstruction_grad_matches_formula_in_any_layout(device, activation):
    """d/dpre of norm * sum((f(pre) - target)^2), by autograd; channels-last pairs keep their layout."""
    g = torch.Generator().manual_seed(5)
    pre = (torch.randn(4, 6, 5, 3, generator=g) * 4).to(device)
    target = torch.relu(torch.randn(4, 6, 5, 3, generator=g) * 4).to(device)
    f = {"none": lambda x: x, "relu": torch.relu, "relu6": torch.nn.functional.relu6}[activation]
    leaf = pre.clone().requires_grad_(True)
    (0.25 * (f(leaf) - target).pow(2).sum()).backward()
    cl = torch.channels_last
    for p, t in ((pre, target), (pre.contiguous(memory_format=cl), target.contiguous(memory_format=cl)),
                 (pre.contiguous(memory_format=cl), target)):
        grad = ops.reconstruction_grad(p, t, activation, 0.25)
        torch.testing.assert_close(grad, leaf.grad)
        if p.stride() == t.stride():
            assert grad.stride() == p.stride()


def test_opcheck_all_ops(device):
    w, v, scale, zp, n, p = _sample_args(device)
    vg = v.clone().requires_grad_(True)
    samples = [
        (ops.soft_quantize.default, (w, vg, scale, zp, n, p, 0)),
        (ops.soft_quantize.default, (w, vg, scale.max(), None, n, p, None)),
        (ops.soft_quantize_backward.default, (torch.randn_like(w), w, v, scale, zp, n, p, 0)),
        (ops.round_regularizer.default, (vg, 4.0)),
        (ops.round_regularizer_backward.default, (torch.tensor(1.5, device=device), v, 4.0)),
        (ops.hard_quantize.default, (w, scale, zp, n, p, 0, "adaptive", v, None)),
        (ops.hard_quantize.default, (w, scale, zp, n, p, 0, "nearest", None, None)),
        (ops.init_v.default, (w, scale, 0)),
        (ops.reconstruction_grad.default, (torch.randn(2, 4, 3, 3, device=device),
                                           torch.randn(2, 4, 3, 3, device=device), "relu", 0.1)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
    state = [v.clone(), torch.zeros_like(v), torch.zeros_like(v), w.clone()]
    base = torch.floor(w / scale.view(-1, 1, 1, 1)) + zp.view(-1, 1, 1, 1)
    torch.library.opcheck(ops.adam_rounding_step_.default,
                          (*state, torch.randn_like(w), base, scale, zp, n, p, 0, 0.01, 4.0, 1e-3, 0.9, 0.999, 1e-8, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_rounding_step_matches_autograd_and_adam(device, dtype):
    """One fused step against autograd through the formulas plus torch.optim.Adam, with whole SIMD
    vectors of saturated V (the kernel's shortcut) and saturated V that momentum pulls back inside."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 131, generator=g, dtype=dtype) * 0.3  # 131: whole 64-float chunks and a scalar tail
    scale = w.abs().amax(1) / 7.4
    v = torch.randn(4, 131, generator=g, dtype=dtype) * 1.5
    v[0, :64] = 3.0 * torch.sign(v[0, :64])          # saturated, stays saturated
    v[1, :64] = 2.4                                  # just saturated (h = 1) ...
    v[2, :64] = -2.4                                 # ... or h = 0
    v[3, 128:] = 3.0                                 # saturated in the scalar tail
    m = torch.randn(4, 131, generator=g, dtype=dtype) * 1e-2
    m2 = torch.rand(4, 131, generator=g, dtype=dtype) * 1e-4 + 1e-6
    m[1, :64], m[2, :64], m2[1:3, :64] = 0.05, -0.05, 1e-4  # ... and momentum pulls it back inside
    grad = torch.randn(4, 131, generator=g, dtype=dtype)
    step, lr, lam, beta = 7, 1e-2, 0.01, 4.0
    n, p = -8, 7
    zp = torch.zeros(4, dtype=dtype)

    ref_v = v.clone().requires_grad_(True)
    loss = (ref.soft_quantize(w, ref_v, scale, None, n, p, 0) * grad).sum() + lam * ref.regularizer(ref_v, beta)
    loss.backward()
    adam = torch.optim.Adam([ref_v], lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    adam.state[ref_v] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.clone(), "exp_avg_sq": m2.clone()}
    adam.step()
    ref_w = ref.soft_quantize(w, ref_v.detach(), scale, None, n, p, 0)
    assert not torch.equal(ref_w[1, :64], ref.soft_quantize(w, v, scale, None, n, p, 0)[1, :64])

    state = [t.clone().to(device) for t in (v, m, m2, ref.soft_quantize(w, v, scale, None, n, p, 0))]
    base = torch.floor(w / scale[:, None]).to(device)
    ops.adam_rounding_step_(*state, grad.to(device), base, scale.to(device), zp.to(device), n, p, 0, lam, beta, lr,
                            0.9, 0.999, 1e-8, step)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[0].cpu(), ref_v.detach(), **tol)
    torch.testing.assert_close(state[1].cpu(), adam.state[ref_v]["exp_avg"], **tol)
    torch.testing.assert_close(state[2].cpu(), adam.state[ref_v]["exp_avg_sq"], **tol)
    torch.testing.assert_close(state[3].cpu(), ref_w, **tol)


def test_torch_compile_traces_the_ops(device):
    w, v, scale, zp, n, p = _sample_args(device)

    def loss_fn(v_):
        return (ae.soft_quantize(w, v_, scale, zp, n, p, 0) ** 2).sum() + 0.01 * ae.round_regularizer(v_, 3.0)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    v1 = v.clone().requires_grad_(True)
    v2 = v.clone().requires_grad_(True)
    compiled(v1).backward()
    loss_fn(v2).backward()
    torch.testing.assert_close(v1.grad, v2.grad)


# ---- bad input -------------------------------------------------------------------------------

def test_quant_range_bits():
    assert ae.quant_range(4) == (-8, 7)
    assert ae.quant_range(8, symmetric=False) == (0, 255)
    for bad in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            ae.quant_range(bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale=torch.ones(5)), "scale must have shape \\[8\\]"),
        (dict(axis=None), "scale must have one element"),
        (dict(quant_min=7, quant_max=7), "quant_min .* must be smaller than quant_max"),
        (dict(quant_min=-256, quant_max=255), "levels"),
        (dict(quant_min=0, quant_max=2), "levels"),
        (dict(weight=torch.ones(8, 6, dtype=torch.int32)), "weight must be a floating-point"),
        (dict(scale=torch.tensor([1.0] * 7 + [0.0])), "scale must be positive and finite"),
        (dict(scale=torch.tensor([1.0] * 7 + [float("inf")])), "scale must be positive and finite"),
        (dict(scale=torch.tensor([1.0] * 7 + [float("nan")])), "scale must be positive and finite"),
        (dict(zero_point=torch.full((8,), 0.5)), "zero_point must hold integers"),
        (dict(zero_point=torch.full((8,), 20.0)), "zero_point must hold integers"),
        (dict(v=torch.zeros(8, 5)), "v must have the shape of weight"),
        (dict(v=torch.zeros(8, 6, dtype=torch.float64)), "v must be Float"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(weight=torch.randn(8, 6), v=torch.zeros(8, 6), scale=torch.ones(8), zero_point=None,
                quant_min=-8, quant_max=7, axis=0)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        ops.soft_quantize(args["weight"], args["v"], args["scale"], args["zero_point"], args["quant_min"],
                          args["quant_max"], args["axis"])


def test_bad_mode_and_missing_aux():
    w = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="mode must be one of"):
        ae.hard_quantize(w, torch.tensor(1.0), None, -8, 7, None, "banker")
    with pytest.raises(RuntimeError, match="needs v"):
        ae.hard_quantize(w, torch.tensor(1.0), None, -8, 7, None, "adaptive")
    with pytest.raises(RuntimeError, match="beta must be finite"):
        ae.round_regularizer(torch.zeros(3), 0.5)


@needs_cuda
def test_mismatched_devices():
    w = torch.randn(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="scale is on cpu but weight is on cuda"):
        ops.soft_quantize(w, torch.zeros(4, 4, device="cuda"), torch.ones(4), None, -8, 7, 0)
    with pytest.raises(RuntimeError, match="v is on cpu but weight is on cuda"):
        ops.soft_quantize(w, torch.zeros(4, 4), torch.ones(4, device="cuda"), None, -8, 7, 0)
    # A CPU weight with a CUDA argument reaches the CUDA kernel: the check's message, not the guard's assert.
    with pytest.raises(RuntimeError, match="v is on cuda:0 but weight is on cpu"):
        ops.soft_quantize(torch.randn(4, 4), torch.zeros(4, 4, device="cuda"), torch.ones(4), None, -8, 7, 0)
    with pytest.raises(RuntimeError, match="scale is on cuda:0 but weight is on cpu"):
        ops.hard_quantize(torch.randn(4, 4), torch.ones(4, device="cuda"), None, -8, 7, 0)


def test_float32_references_run_without_tf32():
    """Tight float32 comparisons on a GPU need full-precision references: cuDNN convolutions default
    to TF32 (conftest turns it off for the whole session; optimize_layer turns it off in its loop)."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
