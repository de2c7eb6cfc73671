"""The CUDA kernels' code, run on the CPU by the host emulation (csrc/device/emulation.h), against
the CPU kernels: every op, every dtype it takes, on the same inputs.

float64 runs the same scalar formulas on both sides; float32 compares the emulation's scalar code
(what CUDA float32 runs) with the CPU's SIMD code (polynomial exp/log within ~1e-6); half and
bfloat16 store float results, so they may differ by one unit in their last place.
"""
import contextlib

import pytest
import torch

import adaround_ext as ae
from adaround_ext import _C

ops = torch.ops.adaround

FLOATS = [torch.float64, torch.float32]
ALL_FLOATS = FLOATS + [torch.float16, torch.bfloat16]
GRIDS = [(None, "symmetric"), (0, "symmetric"), (1, "asymmetric"), (-1, "symmetric")]


@contextlib.contextmanager
def emulating():
    _C.set_cuda_emulation(True)
    try:
        yield
    finally:
        _C.set_cuda_emulation(False)


def both(fn):
    """(CPU kernel result, emulated CUDA kernel result) of fn(), each on fresh copies of the inputs."""
    cpu = fn()
    with emulating():
        emulated = fn()
    return cpu, emulated


def assert_same(cpu, emulated, dtype):
    if isinstance(cpu, (tuple, list)):
        for c, e in zip(cpu, emulated):
            assert_same(c, e, dtype)
        return
    assert cpu.dtype == emulated.dtype and cpu.shape == emulated.shape and cpu.stride() == emulated.stride()
    if not cpu.is_floating_point():
        assert torch.equal(cpu, emulated)
        return
    tol = {torch.float64: 1e-13, torch.float32: 2e-6}.get(cpu.dtype)
    if tol is None:  # one unit in the last place of a half type
        tol = torch.finfo(cpu.dtype).eps
    torch.testing.assert_close(emulated, cpu, rtol=tol, atol=tol)


def case(dtype, axis, kind, shape=(12, 5, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.4).to(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    wf = w.to(compute)
    if axis is None:
        lo, hi = wf.min().reshape(()), wf.max().reshape(())
    else:
        dims = [d for d in range(w.dim()) if d != axis % w.dim()]
        lo, hi = wf.amin(dim=dims), wf.amax(dim=dims)
    if kind == "asymmetric":
        n, p = 0, 15
        scale = (hi - lo) / 14.6
        zp = torch.round(-lo / scale).clamp(n, p)
    else:
        n, p = -8, 7
        scale = torch.maximum(hi.abs(), lo.abs()) / 7.4
        zp = None
    v = torch.randn(shape, generator=g, dtype=compute) * 3
    return w, v, scale, zp, n, p, axis


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("axis,kind", GRIDS)
def test_soft_quantize_and_backward(dtype, axis, kind):
    w, v, scale, zp, n, p, axis = case(dtype, axis, kind)
    assert_same(*both(lambda: ops.soft_quantize(w, v, scale, zp, n, p, axis)), dtype)
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    assert_same(*both(lambda: ops.soft_quantize_backward(grad, w, v, scale, zp, n, p, axis)), dtype)


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("mode", ["nearest", "floor", "ceil", "stochastic", "adaptive"])
@pytest.mark.parametrize("axis,kind", GRIDS)
def test_hard_quantize(dtype, mode, axis, kind):
    w, v, scale, zp, n, p, axis = case(dtype, axis, kind)
    noise = torch.rand(w.shape, generator=torch.Generator().manual_seed(4), dtype=v.dtype)
    assert_same(*both(lambda: ops.hard_quantize(w, scale, zp, n, p, axis, mode, v, noise)), dtype)


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("axis,kind", GRIDS)
def test_init_v(dtype, axis, kind):
    w, v, scale, zp, n, p, axis = case(dtype, axis, kind)
    assert_same(*both(lambda: ops.init_v(w, scale, axis)), dtype)


# Sizes around the block (256 elements) and past one grid-stride round (132 * 8 blocks of 256).
@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 132 * 8 * 256 + 5])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_round_regularizer_and_backward(dtype, numel):
    v = torch.randn(numel, generator=torch.Generator().manual_seed(2), dtype=dtype) * 3
    cpu, emulated = both(lambda: ops.round_regularizer(v, 3.5))
    torch.testing.assert_close(emulated, cpu, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-9)
    grad_out = torch.tensor(0.75, dtype=dtype)
    assert_same(*both(lambda: ops.round_regularizer_backward(grad_out, v, 3.5)), dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_reconstruction_grad(dtype, activation, layout):
    g = torch.Generator().manual_seed(6)
    pre = torch.randn(4, 6, 5, 3, generator=g, dtype=dtype) * 4
    target = torch.relu(torch.randn(4, 6, 5, 3, generator=g, dtype=dtype) * 4)
    if layout != "contiguous":
        pre = pre.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        target = target.contiguous(memory_format=torch.channels_last)
    assert_same(*both(lambda: ops.reconstruction_grad(pre, target, activation, 0.125)), dtype)


def step_state(dtype, seed=0):
    """A [6, 131] layer (per-channel grid) with V saturated, just saturated with momentum pulling it
    back, and free: every branch of the step, in whole SIMD vectors and in tails."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 131, generator=g, dtype=dtype) * 0.3
    scale = w.abs().amax(1) / 7.4
    v = torch.randn(6, 131, generator=g, dtype=dtype) * 1.5
    v[0, :64] = 3.0 * torch.sign(v[0, :64])
    v[1, :64], v[2, :64], v[3, 128:] = 2.4, -2.4, 3.0
    m = torch.randn(6, 131, generator=g, dtype=dtype) * 1e-2
    m2 = torch.rand(6, 131, generator=g, dtype=dtype) * 1e-4 + 1e-6
    m[1, :64], m[2, :64], m2[1:3, :64] = 0.05, -0.05, 1e-4
    base = torch.floor(w / scale[:, None])
    soft = scale[:, None] * torch.clamp(base + torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1), -8, 7)
    grad = torch.randn(6, 131, generator=g, dtype=dtype)
    return [v, m, m2, soft], grad, base, scale, torch.zeros(6, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reg_lambda", [0.0, 0.01])
def test_adam_rounding_step(dtype, reg_lambda):
    """In float32 this is the scalar step CUDA runs against the CPU's SIMD step."""
    state, grad, base, scale, zp = step_state(dtype)

    def step():
        s = [t.clone() for t in state]
        ops.adam_rounding_step_(*s, grad, base, scale, zp, -8, 7, 0, reg_lambda, 4.0, 1e-2, 0.9, 0.999, 1e-8, 7)
        return s

    assert_same(*both(step), dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_adam_rounding_step_scheduled(dtype):
    state, grad, base, scale, zp = step_state(dtype, seed=3)
    schedule = torch.tensor([0.01, 4.0, 1 - 0.9**7, (1 - 0.999**7) ** 0.5], dtype=torch.float64)

    def scheduled():
        s = [t.clone() for t in state]
        ops.adam_rounding_step_scheduled_(*s, grad, base, scale, zp, -8, 7, 0, schedule, 1e-2, 0.9, 0.999, 1e-8)
        return s

    def host_scheduled():
        s = [t.clone() for t in state]
        ops.adam_rounding_step_(*s, grad, base, scale, zp, -8, 7, 0, 0.01, 4.0, 1e-2, 0.9, 0.999, 1e-8, 7)
        return s

    cpu, emulated = both(scheduled)
    assert_same(cpu, emulated, dtype)
    # The same step with its scalars in memory or in the arguments: bit for bit, on each back end.
    for mine, theirs in zip(both(host_scheduled), (cpu, emulated)):
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


def test_emulation_switch_routes_the_ops():
    """The switch really changes the code that runs: float32 regulariser gradients differ in their
    last bits between the CPU's SIMD kernel (polynomial exp/log) and the emulated device code, and
    come back when it is off."""
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 3
    grad_out = torch.tensor(1.0)
    cpu = ops.round_regularizer_backward(grad_out, v, 2.5)
    with emulating():
        assert _C.cuda_emulation()
        emulated = ops.round_regularizer_backward(grad_out, v, 2.5)
    assert not _C.cuda_emulation()
    assert not torch.equal(cpu, emulated)
    assert torch.equal(ops.round_regularizer_backward(grad_out, v, 2.5), cpu)


def test_optimize_layer_takes_the_device_form_when_emulating():
    """Emulated, a Winograd-eligible layer runs as on a GPU (direct convolutions, no packing, the
    schedule in memory, rows copied from the CPU generator): close to the CPU run, not identical."""
    import test_optimize_layer as tol

    w, b, scale, zp, n, p, axis, x, t, geometry = (
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in tol.winograd_large_tile_case("cpu", "relu"))
    opts = dict(iterations=60, batch_size=8, lr=1e-2, reg_lambda=0.05, activation="relu", seed=2, mode="minibatch",
                log_every=1)
    cpu = tol.run(w, b, scale, zp, n, p, axis, x, t, geometry, **opts)
    with emulating():
        emulated = tol.run(w, b, scale, zp, n, p, axis, x, t, geometry, **opts)
    assert not torch.equal(cpu[2], emulated[2])
    torch.testing.assert_close(emulated[2], cpu[2], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(emulated[3], cpu[3], rtol=1e-6, atol=1e-9)


def test_iteration_graph_of_the_emulation():
    """Emulated, an iteration graph records the iteration without running it and runs it on replay
    (what a CUDA graph does for an iteration that reads everything from memory); without emulation the
    CPU has none."""
    assert _C._make_iteration_graph("cpu") is None
    x = torch.zeros(3)
    with emulating():
        graph = _C._make_iteration_graph("cpu")
        assert graph.capture(lambda: x.add_(1))
        assert x.tolist() == [0.0] * 3
        graph.replay()
        graph.replay()
    assert x.tolist() == [2.0] * 3


@pytest.mark.parametrize("size, symmetric", [(8, True), (1, True), (8, False)])
def test_block_reconstruction_through_the_emulated_kernels(monkeypatch, size, symmetric):
    """The block loop's device form: its rounding steps (the scheduled fused step, fed the schedule
    table's rows), soft weights and hard rounding run the CUDA kernels' code, emulated, and learn
    what the CPU kernels learn (float64: the same formulas, summed in other orders); on 1x1 maps
    over the live taps only; symmetric=False: weight grids with zero points."""
    from test_blocks import block_setup

    from adaround_ext import blocks

    model, block, layers, inputs, targets = block_setup(size=size, symmetric=symmetric)
    config = ae.QuantConfig(iterations=30, batch_size=8, warm_start=0.2, quantized_inputs=True, activation_bits=4,
                            reconstruction="block", inner_activations="quantized")
    emulated_steps = []
    step = blocks._Rounding.step
    monkeypatch.setattr(blocks._Rounding, "step", lambda self, *a: emulated_steps.append(_C.cuda_emulation())
                        or step(self, *a))

    def run():
        return blocks.reconstruct_block(blocks.block_module(model, block), layers, inputs, targets, config, seed=3,
                                        activation_bits=4)

    cpu, emulated = both(run)
    assert emulated_steps == [False] * 60 + [True] * 60
    for name in cpu.v:
        torch.testing.assert_close(emulated.v[name], cpu.v[name], rtol=1e-9, atol=1e-9)
        assert torch.equal(emulated.codes[name], cpu.codes[name])
    assert emulated.adaround_error == pytest.approx(cpu.adaround_error, rel=1e-12)
