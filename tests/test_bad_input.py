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
    """Was: still running 20 s after SIGINT (the loop holds the thread with the GIL released). The
    child says when the loop has counted its first iterations, so the signal lands inside it."""
    child = textwrap.dedent("""
        import signal, sys, threading, time, torch
        # Python leaves SIGINT ignored where it started so (a background job of a non-interactive shell)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, "python")
        import adaround_ext as ae
        from adaround_ext import _C
        w = torch.randn(64, 64, 3, 3) * 0.1
        x = torch.randn(256, 64, 8, 8)
        t = torch.nn.functional.conv2d(x, w, padding=1)

        def announce():  # runs while the op holds the main thread with the GIL released
            while _C.optimize_progress()[0] < 3:
                time.sleep(0.01)
            print("iterating", flush=True)

        _C.reset_optimize_progress()
        threading.Thread(target=announce, daemon=True).start()
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
        assert proc.stdout.readline().strip() == "iterating"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0 and "KeyboardInterrupt" in out
    assert took < 3.0, f"{took:.2f} s from SIGINT to KeyboardInterrupt"


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


# ---- save, load and checkpoints ---------------------------------------------------------------

def small_net(extra=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
              nn.Flatten(), nn.Linear(8 * 6 * 6, 5)]
    # extra: one more layer after the same ones (as resnet34 holds every layer name of resnet18).
    model = nn.Sequential(*layers, *([nn.Linear(5, 5)] if extra else []))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


FAST = dict(iterations=30, batch_size=8, num_samples=32, progress=False, activation_bits=None, device="cpu")


def quantized_small_net(tmp_path):
    samples = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    return ae.quantize(small_net(), samples, ae.QuantConfig(rounding="nearest", **FAST)), samples


def test_load_into_another_architecture_fails_naming_the_layers(tmp_path):
    """Was: loaded, leaving the layers the file lacks with random float weights."""
    q, _ = quantized_small_net(tmp_path)
    path = str(tmp_path / "q.pt")
    ae.save_quantized(q, path)
    with pytest.raises(ValueError, match=r"no quantized weights for the model's layers \['7'\]"):
        ae.load_quantized(small_net(extra=True), path)


def test_save_load_save_load_keeps_the_folded_batchnorm(tmp_path):
    """Was: the second save lost the folded-BN list, and the BN came back (output changed)."""
    q, samples = quantized_small_net(tmp_path)
    first, second = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    ae.save_quantized(q, first)
    once = ae.load_quantized(small_net(), first)
    ae.save_quantized(once, second)
    twice = ae.load_quantized(small_net(), second)
    assert isinstance(twice[1], nn.Identity)
    torch.testing.assert_close(twice(samples), once(samples), rtol=0, atol=0)
    torch.testing.assert_close(once(samples), q(samples), rtol=0, atol=0)


def test_damaged_or_foreign_checkpoint_layers_are_recomputed(tmp_path, caplog):
    """Was: a layer file with changed payload bytes, or one copied in from another run, was loaded as it was."""
    samples = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    config = ae.QuantConfig(**FAST)
    ckpt = tmp_path / "ckpt"
    fresh = ae.quantize(small_net(), samples, config, checkpoint_dir=str(ckpt))
    layer_file = ckpt / "layer.3.pt"
    data = bytearray(layer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    other = tmp_path / "other"
    ae.quantize(small_net(), samples * 2, config, checkpoint_dir=str(other))
    (ckpt / "layer.0.pt").write_bytes((other / "layer.0.pt").read_bytes())
    (ckpt / "layer.6.pt").write_bytes(b"")
    with caplog.at_level("WARNING", logger="adaround_ext"):
        resumed = ae.quantize(small_net(), samples, config, checkpoint_dir=str(ckpt))
    for name in ("layer.3.pt", "layer.0.pt", "layer.6.pt"):
        assert any(name in r.getMessage() and "recomputed" in r.getMessage() for r in caplog.records), name
    torch.testing.assert_close(resumed(samples), fresh(samples), rtol=0, atol=0)


def test_two_writers_of_one_checkpoint_directory(tmp_path):
    """Was: one writer died on the other's temporary file (a shared '.tmp' name)."""
    import threading

    from adaround_ext.checkpoint import Checkpoint

    ckpt = Checkpoint(str(tmp_path), "key")
    errors = []

    def write():
        try:
            for _ in range(20):
                ckpt.save("conv", {"codes": torch.zeros(100)}, {"name": "conv"})
        except Exception as exc:  # noqa: BLE001 (the test reports any)
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ckpt.load("conv")["report"] == {"name": "conv"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_meta_tensors_mixed_with_real_ones():
    """Was: uninitialised memory back (the meta kernel answered for the CPU tensors)."""
    w, v, scale = torch.randn(4, 5), torch.zeros(4, 5), torch.full((4,), 0.1)
    with pytest.raises(RuntimeError, match="v is on meta but weight is on cpu"):
        ops.soft_quantize(w, v.to("meta"), scale, None, -8, 7, 0)
    with pytest.raises(RuntimeError, match="scale is on cpu but weight is on meta"):
        ops.hard_quantize(w.to("meta"), scale, None, -8, 7, 0)
    state, grad, base, scale, zp = step_args()
    with pytest.raises(RuntimeError, match="exp_avg is on cpu but v is on meta"):
        step([state[0].to("meta"), *state[1:]], grad, base, scale, zp)
    assert ops.soft_quantize(w.to("meta"), v.to("meta"), scale.to("meta"), None, -8, 7, 0).device.type == "meta"


# ---- BatchNorm folding --------------------------------------------------------------------------

class ConvAtTwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x.flip(-1))


class BatchNormAfterTwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize("make", [ConvAtTwoSites, BatchNormAfterTwoConvs])
def test_batchnorm_is_folded_only_where_that_keeps_the_model(make, caplog):
    """Was: a BN folded into a conv that a second site calls without it (output off by 0.5-0.7), and
    a BN after two convs crashed the folding ('Fusion only for eval!')."""
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    with caplog.at_level("WARNING", logger="adaround_ext"):
        folded = ae.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert "BatchNorm kept unfolded" in caplog.text and "bn" in caplog.text
    torch.testing.assert_close(folded(x), expected)


@pytest.mark.parametrize("mode, extra", [("adaptive", "v"), ("stochastic", "noise")])
def test_hard_quantize_checks_shapes_before_copying_the_weight(device, mode, extra):
    """Was: the weight was made contiguous (a full copy) before v's shape was checked. A 40 GB
    expanded view fails the copy; the shape error must come first."""
    w = torch.zeros(1, 1, device=device).expand(100_000, 100_000)
    wrong = torch.zeros(3, 3, device=device)
    with pytest.raises(RuntimeError, match=f"{extra} must have the shape of weight"):
        ae.hard_quantize(w, torch.tensor(0.1, device=device), None, -8, 7, None, mode, **{extra: wrong})
