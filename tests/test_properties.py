"""A property-based sweep over the ops' arguments (Hypothesis): from finite, valid input every op
returns finite output, or raises a RuntimeError/ValueError naming what is wrong; none crashes or hangs
(each example runs in milliseconds, and the sweep is bounded)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import adaround_ext as ae  # noqa: E402

ops = torch.ops.adaround
SWEEP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def layer_args(draw):
    """A weight, its V, and a grid for it: shapes with empty and size-1 dimensions, per-tensor or
    per-channel on any axis, 2- to 8-bit, symmetric or not, magnitudes from 1e-6 to 1e4."""
    dims = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    magnitude = 10.0 ** draw(st.integers(-6, 4))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(dims, generator=g, dtype=torch.float64) * magnitude).to(dtype)
    v = (torch.randn(dims, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))).to(dtype)
    axis = draw(st.one_of(st.none(), st.integers(-len(dims), len(dims) - 1)))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    n, p = ae.quant_range(bits, symmetric)
    channels = 1 if axis is None else dims[axis]
    scale = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.05) * magnitude / max(p, 1)
    scale = scale.to(dtype).reshape(()) if axis is None else scale.to(dtype)
    zero_point = None if symmetric else torch.randint(n, p + 1, scale.shape, generator=g).to(dtype)
    return w, v, scale, zero_point, n, p, axis


def finite(*tensors):
    return all(bool(torch.isfinite(t.double()).all()) for t in tensors if t.is_floating_point())


@SWEEP
@given(layer_args())
def test_rounding_ops_stay_finite(args):
    w, v, scale, zp, n, p, axis = args
    assert finite(ops.soft_quantize(w, v, scale, zp, n, p, axis))
    assert finite(ops.soft_quantize_backward(torch.ones_like(w), w, v, scale, zp, n, p, axis))
    assert finite(ops.init_v(w, scale, axis))
    assert finite(ops.round_regularizer(v, 2.5), ops.round_regularizer_backward(torch.tensor(1.0), v, 2.5))
    noise = torch.rand(w.shape, dtype=v.dtype)
    for mode in ("nearest", "floor", "ceil", "stochastic", "adaptive"):
        codes, dequantized = ops.hard_quantize(w, scale, zp, n, p, axis, mode, v, noise)
        assert finite(dequantized)
        assert codes.numel() == 0 or (int(codes.min()) >= n and int(codes.max()) <= p)


@SWEEP
@given(layer_args(), st.floats(0, 1), st.floats(1, 30), st.sampled_from([1e-4, 1e-2, 1.0]), st.integers(1, 10**6))
def test_step_stays_finite(args, reg_lambda, beta, lr, step):
    w, v, scale, zp, n, p, axis = args
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    zero = torch.zeros_like(scale) if zp is None else zp
    base = (torch.floor(w / scale.reshape(shape)) + zero.reshape(shape)).contiguous()
    state = [v.clone(), torch.zeros_like(v), torch.zeros_like(v), ops.soft_quantize(w, v, scale, zp, n, p, axis)]
    grad = torch.randn(w.shape, dtype=w.dtype)
    for t in range(step, step + 3):
        ops.adam_rounding_step_(*state, grad, base, scale, zero, n, p, axis, reg_lambda, beta, lr, 0.9, 0.999, 1e-8, t)
    assert finite(*state)


@SWEEP
@given(st.integers(0, 2**16), st.sampled_from(["none", "relu", "relu6"]), st.integers(-3, 6),
       st.sampled_from([torch.float32, torch.float64]))
def test_reconstruction_grad_stays_finite(seed, activation, exponent, dtype):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(3, 4, 5, generator=g, dtype=dtype) * 10.0**exponent
    target = torch.randn(3, 4, 5, generator=g, dtype=dtype) * 10.0**exponent
    assert finite(ops.reconstruction_grad(pre, target, activation, 1.0 / 60))
