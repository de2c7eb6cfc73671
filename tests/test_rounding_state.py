"""_C.RoundingState, the per-layer loop's rounding state (ActiveWeights) as block reconstruction uses it:
the arguments its Python callers can get wrong."""
import pytest
import torch

from adaround_ext import _C

ADAM = _C.adam_constants


def packed_state():
    """A state whose weights were all driven past saturation and packed out: a constant positive
    dL/dW~ pushes every V down, and Adam's momentum keeps pointing that way."""
    torch.manual_seed(0)
    w = torch.randn(8, 16, dtype=torch.float64)
    scale = w.abs().amax(1) / 7
    state = _C.RoundingState(w, scale, torch.zeros_like(scale), -8, 7, 0, True)
    assert state.can_pack
    for t in range(1, 20):
        state.step(torch.ones_like(w), 0.0, 2.0, 1.0, *ADAM, t)
    state.repack()
    assert state.active_fraction < 0.9
    return state, w


def test_a_packed_state_checks_the_gradient_it_reads():
    """Was: the packed step read dL/dW~ through its index without the full step's checks, so a
    gradient of another shape was read out of bounds, silently."""
    state, w = packed_state()
    with pytest.raises(RuntimeError, match="grad_soft_weight must have shape"):
        state.step(torch.ones(3, dtype=torch.float64), 0.0, 2.0, 1.0, *ADAM, 20)
    with pytest.raises(RuntimeError, match="grad_soft_weight must be"):
        state.step(torch.ones_like(w, dtype=torch.float32), 0.0, 2.0, 1.0, *ADAM, 20)
    with pytest.raises(RuntimeError, match="share memory"):
        state.step(state.soft_weight, 0.0, 2.0, 1.0, *ADAM, 20)


def test_packing_keeps_the_rounding_and_the_soft_weight():
    """Every V ends with h(V) = 0 (most packed out past saturation, the rest on its edge, where the
    gradient is 0 too): the soft weights are the rounded-down grid points, the regulariser is 0."""
    state, w = packed_state()
    h = (torch.sigmoid(state.v) * 1.2 - 0.1).clamp(0, 1)
    assert (h == 0).all()
    scale = (w.abs().amax(1) / 7).view(-1, 1)
    expected = scale * torch.clamp(torch.floor(w / scale), -8, 7)
    torch.testing.assert_close(state.soft_weight, expected, rtol=0, atol=1e-12)
    assert state.regularizer(2.0).item() == 0.0


def test_the_scheduled_step_refuses_packed_weights():
    state, _ = packed_state()
    row = _C.schedule_table(iterations=20)[19].contiguous()
    with pytest.raises(RuntimeError, match="never packed"):
        state.step_scheduled(torch.ones_like(state.soft_weight), row, 1.0, *ADAM)
