"""On a CUDA device only (the GPU check selects these with -m cuda): the CUDA kernels against the CPU
kernels on the same inputs, optimize_layer on both with the same minibatch rows, and the iteration
graph's capture, its fallback and the per-device behaviour that the host emulation cannot show."""
import warnings

import pytest
import torch

from adaround_ext import _C
from conftest import HAS_CUDA
from test_cuda_emulation import ALL_FLOATS, FLOATS, GRIDS, case, emulating, step_state
import test_optimize_layer as layer_tests

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

ops = torch.ops.adaround


def on(device, args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def assert_close_to_cpu(gpu, cpu, dtype):
    """Device libm (exp, log, pow) and glibc's agree to a few units in the last place; half types
    store the float result, so may differ by one unit of theirs."""
    if isinstance(cpu, (tuple, list)):
        for g, c in zip(gpu, cpu):
            assert_close_to_cpu(g, c, dtype)
        return
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    if not cpu.is_floating_point():
        assert torch.equal(gpu.cpu(), cpu)
        return
    tol = {torch.float64: 1e-12, torch.float32: 5e-6}.get(cpu.dtype, torch.finfo(cpu.dtype).eps)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("axis,kind", GRIDS)
def test_rounding_ops_match_the_cpu(dtype, axis, kind):
    w, v, scale, zp, n, p, axis = case(dtype, axis, kind)
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    noise = torch.rand(w.shape, generator=torch.Generator().manual_seed(4), dtype=v.dtype)
    calls = [
        (ops.soft_quantize, (w, v, scale, zp, n, p, axis)),
        (ops.soft_quantize_backward, (grad, w, v, scale, zp, n, p, axis)),
        (ops.init_v, (w, scale, axis)),
    ] + [(ops.hard_quantize, (w, scale, zp, n, p, axis, mode, None, noise))
         for mode in ("nearest", "floor", "ceil", "stochastic")]
    for op, args in calls:
        assert_close_to_cpu(op(*on("cuda", args)), op(*args), dtype)
    # Adaptive rounding flips where h(V) is within rounding of 1/2; nowhere else.
    codes_gpu, _ = ops.hard_quantize(*on("cuda", (w, scale, zp, n, p, axis, "adaptive", v, None)))
    codes_cpu, _ = ops.hard_quantize(w, scale, zp, n, p, axis, "adaptive", v, None)
    near_half = (torch.sigmoid(v) * 1.2 - 0.1 - 0.5).abs() < 1e-6
    assert torch.equal(codes_gpu.cpu()[~near_half], codes_cpu[~near_half])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_step_ops_match_the_cpu(dtype):
    v = torch.randn(132 * 8 * 256 + 5, generator=torch.Generator().manual_seed(2), dtype=dtype) * 3
    for grad_out in (torch.tensor(0.75, dtype=dtype), torch.tensor(0.75, dtype=dtype).cuda()):
        # A CPU scalar gradient (as autograd may hand one over) is moved, not read through a device pointer.
        assert_close_to_cpu(ops.round_regularizer_backward(grad_out, v.cuda(), 3.5),
                            ops.round_regularizer_backward(grad_out.cpu(), v, 3.5), dtype)
    torch.testing.assert_close(ops.round_regularizer(v.cuda(), 3.5).cpu(), ops.round_regularizer(v, 3.5),
                               rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-9)
    pre = torch.randn(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    target = torch.randn(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grad = ops.reconstruction_grad(pre.cuda(), target.cuda(), "relu", 0.5)
    assert grad.stride() == pre.stride()
    assert_close_to_cpu(grad, ops.reconstruction_grad(pre, target, "relu", 0.5), dtype)
    state, g, base, scale, zp = step_state(dtype)
    schedule = torch.tensor([0.01, 4.0, 1 - 0.9**7, (1 - 0.999**7) ** 0.5], dtype=torch.float64)
    cpu, gpu = [t.clone() for t in state], [t.cuda() for t in state]
    ops.adam_rounding_step_(*cpu, g, base, scale, zp, -8, 7, 0, 0.01, 4.0, 1e-2, 0.9, 0.999, 1e-8, 7)
    ops.adam_rounding_step_(*gpu, *on("cuda", (g, base, scale, zp)), -8, 7, 0, 0.01, 4.0, 1e-2, 0.9, 0.999, 1e-8, 7)
    assert_close_to_cpu(gpu, cpu, dtype)
    gpu = [t.cuda() for t in state]
    ops.adam_rounding_step_scheduled_(*gpu, *on("cuda", (g, base, scale, zp)), -8, 7, 0, schedule.cuda(), 1e-2, 0.9,
                                      0.999, 1e-8)
    assert_close_to_cpu(gpu, cpu, dtype)


@pytest.mark.parametrize("case_fn", [layer_tests.conv_case, layer_tests.linear_case, layer_tests.transposed_case,
                                     layer_tests.winograd_large_tile_case])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_optimize_layer_matches_the_cpu_and_its_emulation(case_fn, cuda_graph):
    """float64, the same minibatch rows on every device (drawn from the seeded CPU generator)."""
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in case_fn("cpu", "relu")]
    opts = dict(iterations=300, batch_size=8, lr=1e-2, reg_lambda=0.05, activation="relu", seed=3,
                mode="minibatch", log_every=7)
    cpu = layer_tests.run(*args, **opts)
    with emulating():
        emulated = layer_tests.run(*args, cuda_graph=cuda_graph, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no capture fallback
        gpu = layer_tests.run(*on("cuda", args[:9]), args[9], cuda_graph=cuda_graph, **opts)
    for reference in (cpu, emulated):
        torch.testing.assert_close(gpu[3].cpu().double(), reference[3].double(), rtol=1e-6, atol=1e-9)
        decided = (reference[2].abs() > 1e-3)
        assert torch.equal((gpu[2].cpu() >= 0)[decided], (reference[2] >= 0)[decided])
    torch.testing.assert_close(gpu[2].cpu(), emulated[2], rtol=1e-7, atol=1e-7)


def test_ops_capture_in_a_cuda_graph():
    """No host synchronisation inside an op call: they can be captured from Python."""
    w, v, scale, zp, n, p, axis = on("cuda", case(torch.float32, 0, "asymmetric"))
    ops.soft_quantize(w, v, scale, zp, n, p, axis)  # first launches (module loading) outside the capture
    ops.round_regularizer(v, 3.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.soft_quantize(w, v, scale, zp, n, p, axis)
        reg = ops.round_regularizer(v, 3.0)
    v.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.soft_quantize(w, v, scale, zp, n, p, axis))
    torch.testing.assert_close(reg, ops.round_regularizer(v, 3.0))


def test_iteration_graph_replays_and_falls_back():
    caller = torch.cuda.current_stream()
    graph = _C._make_iteration_graph("cuda")
    assert torch.cuda.current_stream() != caller  # iterations run on a side stream
    x = torch.zeros(4, device="cuda")
    x.add_(1)  # eager work first, as the loop's first (logged) iteration
    assert graph.capture(lambda: x.add_(1))
    for _ in range(3):
        graph.replay()
    del graph
    assert torch.cuda.current_stream() == caller
    assert x.tolist() == [4.0] * 4

    for iteration, reason in ((lambda: None, "recorded no work"), (lambda: x.add_(1).sum().item(), "")):
        graph = _C._make_iteration_graph("cuda")
        with pytest.warns(UserWarning, match="could not capture an iteration in a CUDA graph, running eagerly.*"
                          + reason):
            assert not graph.capture(iteration)
        del graph
    x.add_(1)  # the device is usable after a failed capture
    assert x.tolist() == [5.0] * 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_optimize_layer_on_the_second_device():
    """The loop runs on its weight's device whatever the current one is, graphs included."""
    args = layer_tests.conv_case("cpu", "relu")
    opts = dict(iterations=200, lr=1e-2, activation="relu", mode="minibatch", log_every=50)
    first = layer_tests.run(*on("cuda:0", args[:9]), args[9], cuda_graph=True, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = layer_tests.run(*on("cuda:1", args[:9]), args[9], cuda_graph=True, **opts)
    assert second[2].device == torch.device("cuda:1")
    assert torch.equal(first[2].cpu(), second[2].cpu())
