"""Bad input and faults: a clear error naming the argument, the layer or the iteration, never a
crash, a hang, an ignored Ctrl-C or a silently wrong result."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import adaround_ext as ae
from conftest import cpu_paths

ops = torch.ops.adaround
ROOT = os.path.join(os.path.dirname(__file__), "..")


def values_checked_here(t):
    """Values are checked where reading them is free: tensors in CPU memory (also when emulating)."""
    return t.is_cpu


# ---- optimize_layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "exact", "minibatch"])
def test_layer_without_output_channels(device, mode):
    """Was SIGFPE (integer division by the 0 output channels) in auto and exact mode."""
    w = torch.randn(0, 16, device=device)
    with pytest.raises(RuntimeError, match=r"weight of shape \[0, 16\] has no elements"):
        ops.optimize_layer(w, None, torch.tensor(0.1, device=device), None, -8, 7, None,
                           torch.randn(8, 16, device=device), torch.randn(8, 0, device=device), iterations=1,
                           batch_size=1, mode=mode)


def test_quantize_names_the_layer_without_output_channels():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0))
    config = ae.QuantConfig(iterations=5, batch_size=4, num_samples=16, progress=False, activation_bits=None)
    with pytest.raises((RuntimeError, ValueError), match="(layer 1|'1').*(no elements|empty|0)"):
        ae.quantize(model, torch.randn(16, 8), config)


def overflow_case(device):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(6, 10, generator=g) * 0.3).to(device)
    x = torch.randn(32, 10, generator=g).to(device)
    x[3] = 1e30  # finite, and so are the targets, but its squared error overflows float32
    return w, w.abs().amax(1) / 7.4, x, x @ w.t()


def test_loss_that_overflows_stops_the_run(device):
    """Was: V all NaN, the codes plain floor rounding, reported as success."""
    w, scale, x, t = overflow_case(device)
    with pytest.raises(RuntimeError, match=r"the loss became (inf|nan) at iteration \d+"):
        ops.optimize_layer(w, None, scale, None, -8, 7, 0, x, t, iterations=50, batch_size=32, mode="minibatch",
                           log_every=1)


@pytest.mark.parametrize("options,match", [
    (dict(reg_lambda=1e300), r"the loss became (inf|nan)|V became NaN"),
    (dict(beta_start=float("inf")), "beta_start and beta_end must be finite"),
    (dict(beta_end=float("nan")), "beta_start and beta_end must be finite"),
])
def test_extreme_schedules_are_errors(device, options, match):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(6, 10, generator=g) * 0.3).to(device)
    x = torch.randn(32, 10, generator=g).to(device)
    with pytest.raises(RuntimeError, match=match):
        ops.optimize_layer(w, None, w.abs().amax(1) / 7.4, None, -8, 7, 0, x, x @ w.t(), iterations=40,
                           batch_size=8, mode="minibatch", warm_start=0.0, log_every=1, **options)


def test_ctrl_c_interrupts_a_long_run():
    """Was: still running 20 s after SIGINT (the loop holds the thread with the GIL released)."""
    child = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "python")
        import adaround_ext as ae
        w = torch.randn(64, 64, 3, 3) * 0.1
        x = torch.randn(256, 64, 8, 8)
        t = torch.nn.functional.conv2d(x, w, padding=1)
        print("started", flush=True)
        try:
            ae.optimize_layer(w, None, w.abs().amax((1, 2, 3)) / 7.4, None, -8, 7, 0, x, t, padding=(1, 1),
                              iterations=10**8, mode="minibatch")
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            sys.exit(0)
        sys.exit(3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.5)  # inside the loop
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0 and "KeyboardInterrupt" in out
    assert took < 2.0, f"{took:.2f} s from SIGINT to KeyboardInterrupt"


# ---- the ops ------------------------------------------------------------------------------------

def test_nan_v_shows_in_soft_weights_and_regulariser(device):
    """Was: a NaN V acted as h = 0 (clipped to the bound) on the scalar paths."""
    w = torch.randn(4, 5, device=device, dtype=torch.float64)
    v = torch.zeros(4, 5, device=device, dtype=torch.float64)
    v[1, 2] = float("nan")
    scale = torch.full((4,), 0.1, device=device, dtype=torch.float64)
    soft = ae.soft_quantize(w, v, scale, None, -8, 7, 0)
    assert soft[1, 2].isnan() and soft.isnan().sum() == 1
    assert ae.round_regularizer(v, 2.0).isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_quantize_rejects_what_has_no_code(device, dtype):
    w = torch.randn(4, 5, device=device, dtype=dtype)
    scale = torch.tensor(0.1, device=device)
    if not values_checked_here(w):
        pytest.skip("values are checked where reading them is free (CPU memory)")
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="weight contains NaN or Inf"):
        ae.hard_quantize(bad, scale, None, -8, 7, None, "nearest")
    v = torch.zeros(4, 5, device=device, dtype=dtype)
    v[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="v contains NaN"):
        ae.hard_quantize(w, scale, None, -8, 7, None, "adaptive", v=v)
    for value in (1.0, -0.25, float("nan")):
        noise = torch.full((4, 5), 0.5, device=device, dtype=dtype)
        noise[1, 1] = value
        with pytest.raises(RuntimeError, match=r"noise must hold uniform samples in \[0, 1\)"):
            ae.hard_quantize(w, scale, None, -8, 7, None, "stochastic", noise=noise)


def step_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g, dtype=dtype)
    scale = w.abs().amax(1) / 7.4
    v = torch.randn(4, 6, generator=g, dtype=dtype)
    state = [v, torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v)]
    grad = torch.randn(4, 6, generator=g, dtype=dtype)
    base = torch.floor(w / scale[:, None])
    return state, grad, base, scale, torch.zeros(4, dtype=dtype)


def step(state, grad, base, scale, zp, reg_lambda=0.01, beta=4.0):
    ops.adam_rounding_step_(*state, grad, base, scale, zp, -8, 7, 0, reg_lambda, beta, 1e-3, 0.9, 0.999, 1e-8, 3)


def test_adam_step_rejects_shared_memory():
    """Was: aliased state silently off by 0.23, overlapping state by 1.8e6."""
    state, grad, base, scale, zp = step_args()
    with pytest.raises(RuntimeError, match="v and exp_avg share memory"):
        step([state[0], state[0], state[2], state[3]], grad, base, scale, zp)
    big = torch.zeros(2 * 24)
    overlapping = [big[:24].view(4, 6), big[12:36].view(4, 6), state[2], state[3]]
    with pytest.raises(RuntimeError, match="v and exp_avg share memory"):
        step(overlapping, grad, base, scale, zp)
    with pytest.raises(RuntimeError, match="soft_weight and grad_soft_weight share memory"):
        step(state, state[3], base, scale, zp)


def test_adam_step_rejects_tensors_guarded_against_in_place_updates():
    state, grad, base, scale, zp = step_args()
    leaf = state[0].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="v requires grad"):
        step([leaf, *state[1:]], grad, base, scale, zp)
    with torch.inference_mode():
        frozen = state[1].clone()
    with pytest.raises(RuntimeError, match="exp_avg is an inference tensor"):
        step([state[0], frozen, *state[2:]], grad, base, scale, zp)


@pytest.mark.parametrize("change,match", [
    (dict(reg_lambda=float("nan")), "reg_lambda must be finite and >= 0"),
    (dict(reg_lambda=-0.1), "reg_lambda must be finite and >= 0"),
    (dict(beta=float("nan")), "beta must be finite and >= 1"),
    (dict(beta=0.5), "beta must be finite and >= 1"),
    (dict(scale=torch.zeros(4)), "scale must be positive and finite"),
    (dict(scale=torch.full((4,), float("nan"))), "scale must be positive and finite"),
    (dict(zp=torch.full((4,), float("nan"))), "zero_point must hold integers"),
])
def test_adam_step_rejects_bad_values(change, match):
    """Was: NaN or zero state, no error."""
    state, grad, base, scale, zp = step_args()
    kwargs = dict(reg_lambda=0.01, beta=4.0)
    kwargs.update({k: v for k, v in change.items() if k in kwargs})
    scale = change.get("scale", scale)
    zp = change.get("zp", zp)
    with pytest.raises(RuntimeError, match=match):
        step(state, grad, base, scale, zp, **kwargs)


@pytest.mark.parametrize("field,value,error", [
    ("per_channel", "no", TypeError),      # was: silently per-channel ("no" is truthy)
    ("batch_size", "8", TypeError),        # was: a raw TypeError deep in the pipeline
    ("num_samples", 2.5, TypeError),
    ("iterations", True, TypeError),
    ("lr", float("nan"), ValueError),
    ("reg_lambda", float("inf"), ValueError),
    ("scale_method", None, TypeError),
])
def test_quant_config_types(field, value, error):
    with pytest.raises(error, match=f"QuantConfig.{field} must be"):
        ae.QuantConfig(**{field: value})
    ae.QuantConfig(device=torch.device("cpu"), lr=1, first_layer_bits=None)  # ints for floats, devices are fine
