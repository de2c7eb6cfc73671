"""optimize_layer against the plain-PyTorch AdaRound loop, convergence, exact mode, bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import adaround_ext as ae
from adaround_testbed import reference as ref
from conftest import cpu_paths, needs_cuda

ops = torch.ops.adaround


def run(w, b, scale, zp, n, p, axis, inputs, targets, geometry=None, **options):
    geometry = geometry or {}
    return ops.optimize_layer(
        w, b, scale, zp, n, p, axis, inputs, targets,
        list(geometry.get("stride", [1])), list(geometry.get("padding", [0])),
        list(geometry.get("dilation", [1])), geometry.get("groups", 1),
        transposed=geometry.get("transposed", False), output_padding=list(geometry.get("output_padding", [0])),
        **options)


def make_conv_case(device, activation, weight_shape, weight_std, input_shape, geometry, axis=0, seed=0):
    """A conv layer with per-channel 4-bit grid on `axis`, its cache (x^ = x + noise: "partly
    quantized" inputs) and targets f_a(conv(x))."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(weight_shape, generator=g) * weight_std).to(device)
    out_channels = weight_shape[1] * geometry["groups"] if geometry.get("transposed") else weight_shape[0]
    b = (torch.randn(out_channels, generator=g) * 0.1).to(device)
    x = torch.randn(input_shape, generator=g).to(device)
    x_hat = x + 0.05 * torch.randn(x.shape, generator=g).to(device)
    targets = ref.ACTIVATIONS[activation](ref.layer_forward(x, w, b, geometry))
    # Not amax / 7: an element exactly on a grid point sits where h(V) = 0 is a clip boundary, and
    # one ulp decides whether its gradient is zero (Adam then moves it by lr or not at all).
    scale = w.abs().amax(dim=tuple(d for d in range(w.dim()) if d != axis)) / 7.4
    return w, b, scale, None, -8, 7, axis, x_hat, targets, geometry


def conv_case(device, activation, seed=0):
    geometry = dict(stride=[2, 1], padding=[1, 1], dilation=[1, 1], groups=2)
    return make_conv_case(device, activation, (8, 3, 3, 3), 0.3, (64, 6, 9, 7), geometry, seed=seed)


def linear_case(device, activation, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(10, 12, generator=g) * 0.5).to(device)
    b = (torch.randn(10, generator=g) * 0.1).to(device)
    x = torch.randn(48, 12, generator=g).to(device)
    targets = ref.ACTIVATIONS[activation](F.linear(x, w, b))
    # With x^ == x the initial residual is rounding noise, which Adam scales up to lr-sized steps.
    x_hat = x + 0.05 * torch.randn(x.shape, generator=g).to(device)
    scale = (w.max() - w.min()).reshape(()) / 14.6  # off the grid points, as in conv_case
    zp = torch.round(-w.min() / scale).reshape(())
    return w, b, scale, zp, 0, 15, None, x_hat, targets, {}


def small_map_case(device, activation, seed=0):
    """A 3x3 stride-2 conv on 2x2 maps (ResNet layer4 at 32x32 inputs): one output position, and 5
    of the 9 taps only ever see padding. On the CPU this runs the unfolded-GEMM path."""
    geometry = dict(stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=1)
    return make_conv_case(device, activation, (6, 4, 3, 3), 0.3, (40, 4, 2, 2), geometry, seed=seed)


def depthwise_small_map_case(device, activation, seed=0):
    """A depthwise 3x3 conv with two outputs per channel on 3x3 maps (MobileNetV2's late blocks): on the
    CPU its weight gradient is the direct sum (csrc/cpu/depthwise_grad.h), not the library's."""
    geometry = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=6)
    return make_conv_case(device, activation, (12, 1, 3, 3), 0.3, (40, 6, 3, 3), geometry, seed=seed)


def wide_conv_case(device, activation, seed=0):
    """16 input channels on 7x7 maps: on the CPU in float32 the loop runs on channels-last copies of
    the caches (kChannelsLastMinChannels in csrc/loop/choose_path.cpp). Odd output sizes keep it off
    the Winograd path."""
    geometry = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    return make_conv_case(device, activation, (8, 16, 3, 3), 0.15, (40, 16, 7, 7), geometry, seed=seed)


def winograd_case(device, activation, seed=0):
    """A 3x3 stride-1 conv with 16 input channels and even 6x8 outputs (padding 1 in height, 0 in
    width): on the CPU the loop runs it as Winograd F(2x2, 3x3) (csrc/cpu/winograd.h)."""
    geometry = dict(stride=[1, 1], padding=[1, 0], dilation=[1, 1], groups=1)
    return make_conv_case(device, activation, (8, 16, 3, 3), 0.15, (40, 16, 6, 10), geometry, seed=seed)


def winograd_large_tile_case(device, activation, seed=0):
    """16 input channels and 8x8 outputs: outputs in multiples of 4 and 64 positions, so on the CPU the
    loop runs Winograd F(4x4, 3x3)."""
    geometry = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    return make_conv_case(device, activation, (8, 16, 3, 3), 0.15, (40, 16, 8, 8), geometry, seed=seed)


def transposed_case(device, activation, seed=0):
    """A strided, grouped ConvTranspose2d with output_padding: weight [in, out / groups, kh, kw], the
    per-channel grid on axis 1 (its output channels)."""
    geometry = dict(stride=[2, 1], padding=[1, 0], dilation=[1, 1], groups=2, transposed=True,
                    output_padding=[1, 0])
    return make_conv_case(device, activation, (6, 4, 3, 2), 0.3, (48, 6, 5, 4), geometry, axis=1, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [conv_case, linear_case, small_map_case, transposed_case, wide_conv_case,
                                  winograd_case, winograd_large_tile_case, depthwise_small_map_case])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_first_iterations_match_plain_pytorch(device, case, activation, dtype):
    w, b, scale, zp, n, p, axis, x, t, geometry = (
        a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case(device, activation))
    opts = dict(iterations=50, batch_size=8, lr=1e-2, reg_lambda=0.05, warm_start=0.2, activation=activation, seed=3)
    _, _, v, curve, *_ = run(w, b, scale, zp, n, p, axis, x, t, geometry, mode="minibatch", log_every=1, **opts)
    v_init = None
    if case is small_map_case and cpu_paths(w):
        # The CPU's unfolded path learns the live columns only and decides the dead ones (zero
        # gradient: the regulariser alone would only push them away from h = 1/2) as nearest.
        dead = ref.dead_weights(x, w, geometry)
        assert 0 < dead.sum() < dead.numel()
        v_init = ref.decided_nearest(ref.init_v(w, scale, axis), dead)
    ref_v, ref_losses = ref.adaround_loop(w, b, scale, zp, n, p, axis, x, t, geometry, v_init=v_init, **opts)
    if dtype == torch.float64:
        torch.testing.assert_close(curve.cpu().double(), ref_losses.double(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, ref_v, rtol=1e-8, atol=1e-8)
    else:
        # float32: summation order differs (GEMM vs autograd), and Adam turns a gradient that cancels
        # to ~0 into a full lr step of either sign, so compare the losses and most of V.
        torch.testing.assert_close(curve.cpu(), ref_losses.float(), rtol=2e-3, atol=1e-5)
        assert ((v - ref_v).abs() < 1e-3).float().mean() > 0.95


@pytest.mark.parametrize("case", [conv_case, small_map_case, transposed_case, winograd_case,
                                  winograd_large_tile_case, depthwise_small_map_case])
def test_long_run_with_frozen_weights_matches_plain_pytorch(device, case):
    """Past the first repack (every 200 iterations) the CPU steps only the weights whose V is not yet
    saturated with momentum pointing out. In float64 everything else must still follow the plain loop:
    the loss curve, every unsaturated V, and the side of every V (the rounding)."""
    w, b, scale, zp, n, p, axis, x, t, geometry = (
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case(device, "relu"))
    opts = dict(iterations=450, batch_size=8, lr=5e-2, reg_lambda=0.05, warm_start=0.2, activation="relu", seed=1)
    _, _, v, curve, *_ = run(w, b, scale, zp, n, p, axis, x, t, geometry, mode="minibatch", log_every=1, **opts)
    v_init = None
    if case is small_map_case and cpu_paths(w):
        v_init = ref.decided_nearest(ref.init_v(w, scale, axis), ref.dead_weights(x, w, geometry))
    ref_v, ref_losses = ref.adaround_loop(w, b, scale, zp, n, p, axis, x, t, geometry, v_init=v_init, **opts)
    torch.testing.assert_close(curve.cpu().double(), ref_losses.double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(v >= 0, ref_v >= 0)
    saturated = v.abs() >= ref.SATURATED_V
    assert torch.equal(saturated, saturated & (ref_v.abs() >= ref.SATURATED_V))
    torch.testing.assert_close(v[~saturated], ref_v[~saturated], rtol=1e-8, atol=1e-8)
    if cpu_paths(w):  # packed out: the plain loop's momentum carried those V further out
        assert (ref_v.abs() > v.abs() + 1e-6)[saturated].any()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case, flag", [(winograd_case, "1"), (winograd_large_tile_case, "4"),
                                        (winograd_large_tile_case, "2")])
def test_winograd_and_direct_convolution_agree(monkeypatch, with_bias, case, flag):
    """ADAROUND_WINOGRAD=0 runs the Winograd-eligible layer through oneDNN's convolutions instead; =2
    and =4 ask for the tile side. Every path follows the plain loop (test above); here they must agree
    with each other, bias or none, while not being bit-identical: the switch really changes the path."""
    w, b, scale, zp, n, p, axis, x, t, geometry = case("cpu", "relu")
    opts = dict(iterations=50, batch_size=8, lr=1e-2, reg_lambda=0.05, warm_start=0.2, activation="relu", seed=3,
                mode="minibatch", log_every=1)
    results = {}
    for setting in (flag, "0"):
        monkeypatch.setenv("ADAROUND_WINOGRAD", setting)
        results[setting] = run(w, b if with_bias else None, scale, zp, n, p, axis, x, t, geometry, **opts)
    (_, codes_w, v_w, curve_w, *_), (_, codes_d, v_d, curve_d, *_) = results[flag], results["0"]
    assert not torch.equal(v_w, v_d)
    torch.testing.assert_close(curve_w, curve_d, rtol=1e-4, atol=1e-6)
    assert ((v_w - v_d).abs() < 1e-3).float().mean() > 0.95
    assert (codes_w == codes_d).float().mean() > 0.99


def test_winograd_tile_follows_the_output_size(monkeypatch):
    """8x8 outputs take F(4x4, 3x3) by default; 6x8 outputs, not multiples of 4, take F(2x2, 3x3),
    also when ADAROUND_WINOGRAD=4 asks for the large tile."""
    opts = dict(iterations=20, batch_size=8, activation="relu", seed=3, mode="minibatch")

    def v_with(case, setting):
        if setting is None:
            monkeypatch.delenv("ADAROUND_WINOGRAD", raising=False)
        else:
            monkeypatch.setenv("ADAROUND_WINOGRAD", setting)
        return run(*case("cpu", "relu"), **opts)[2]

    default = v_with(winograd_large_tile_case, None)
    assert torch.equal(default, v_with(winograd_large_tile_case, "4"))
    assert not torch.equal(default, v_with(winograd_large_tile_case, "2"))
    default = v_with(winograd_case, None)
    assert torch.equal(default, v_with(winograd_case, "2"))
    assert torch.equal(default, v_with(winograd_case, "4"))
    assert not torch.equal(default, v_with(winograd_case, "0"))


def test_same_seed_same_result(device):
    w, b, scale, zp, n, p, axis, x, t, geometry = conv_case(device, "relu")
    first = run(w, b, scale, zp, n, p, axis, x, t, geometry, iterations=30, seed=5, activation="relu")
    second = run(w, b, scale, zp, n, p, axis, x, t, geometry, iterations=30, seed=5, activation="relu")
    other = run(w, b, scale, zp, n, p, axis, x, t, geometry, iterations=30, seed=6, activation="relu")
    assert torch.equal(first[2], second[2])
    assert not torch.equal(first[2], other[2])


def test_progress_counter_and_iteration_bar(device, capsys):
    """The op reports every iteration to the counter the Python progress bar polls."""
    from adaround_ext import _C

    w, b, scale, zp, n, p, axis, x, t, geometry = conv_case(device, "relu")
    _C.reset_optimize_progress()
    assert _C.optimize_progress() == (0, 0)
    run(w, b, scale, zp, n, p, axis, x, t, geometry, iterations=37, activation="relu")
    assert _C.optimize_progress() == (37, 37)
    ae.optimize_layer(w, b, scale, zp, n, p, axis, x, t, **geometry, iterations=23, activation="relu",
                      progress="bar-test")
    assert _C.optimize_progress() == (23, 23)
    assert "bar-test" in capsys.readouterr().err


def heldout_error(w_q, b, x, t, geometry, activation):
    return ((ref.ACTIVATIONS[activation](ref.layer_forward(x, w_q, b, geometry)) - t) ** 2).sum().item()


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_converges_below_nearest_on_heldout_data(device, activation):
    g = torch.Generator().manual_seed(1)
    geometry = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    w = (torch.randn(16, 8, 3, 3, generator=g) * 0.2).to(device)
    b = (torch.randn(16, generator=g) * 0.1).to(device)
    # Correlated inputs make the rounding choices interact, as in real layers; the scale keeps the
    # reconstruction error in the range that lambda = 0.01 is calibrated for.
    mix = torch.randn(8, 8, generator=g) * 0.1
    x = torch.einsum("nchw,cd->ndhw", torch.randn(512, 8, 6, 6, generator=g), mix).to(device)
    t = ref.ACTIVATIONS[activation](ref.layer_forward(x, w, b, geometry))
    scale = w.abs().amax(dim=(1, 2, 3)) / 3  # 3-bit grid
    train, held = slice(0, 256), slice(256, 512)
    quantized, _, v, _, nearest_err, ada_err, undecided, _ = run(
        w, b, scale, None, -4, 3, 0, x[train], t[train], geometry, iterations=2000, lr=1e-2,
        activation=activation, mode="minibatch")
    nearest = ae.hard_quantize(w, scale, None, -4, 3, 0, "nearest")[1]
    assert ada_err < nearest_err
    assert heldout_error(quantized, b, x[held], t[held], geometry, activation) < \
        0.8 * heldout_error(nearest, b, x[held], t[held], geometry, activation)
    assert undecided < 0.01


def test_exact_mode_loss_equals_direct_loss(device):
    w, b, scale, zp, n, p, axis, x, _, geometry = conv_case(device, "none")
    t = ref.layer_forward(x, w, b, geometry) + 0.1 * torch.randn(x.shape[0], 8, 5, 7, device=device)
    *_, curve, _, _, _, exact = run(w, b, scale, zp, n, p, axis, x, t, geometry, iterations=1, log_every=1,
                                    mode="exact", reg_lambda=0.0)
    assert exact
    w_soft = ae.soft_quantize(w, ae.init_v(w, scale, axis), scale, zp, n, p, axis)
    direct = ((ref.layer_forward(x, w_soft, b, geometry) - t) ** 2).sum() / (t.shape[0] * t[0, 0].numel())
    torch.testing.assert_close(curve[0].double().cpu(), direct.double().cpu(), rtol=1e-6, atol=1e-7)


def test_exact_mode_no_worse_than_minibatch(device):
    w, b, scale, zp, n, p, axis, x, t, geometry = conv_case(device, "none")
    scale = scale * 7 / 3  # 3-bit
    common = dict(iterations=1500, lr=1e-2, batch_size=8)
    exact = run(w, b, scale, zp, -4, 3, axis, x, t, geometry, mode="exact", **common)
    mini = run(w, b, scale, zp, -4, 3, axis, x, t, geometry, mode="minibatch", **common)
    assert exact[7] and not mini[7]
    assert exact[5] <= mini[5] * 1.02
    assert exact[5] < exact[4]


def test_auto_mode_prefers_exact_for_identity_and_small_kernels(device):
    w, b, scale, zp, n, p, axis, x, t, _ = linear_case(device, "none")
    assert run(w, b, scale, zp, n, p, axis, x, t, iterations=20, batch_size=8)[7]
    w, b, scale, zp, n, p, axis, x, t, _ = linear_case(device, "relu")
    assert not run(w, b, scale, zp, n, p, axis, x, t, iterations=20, batch_size=8, activation="relu")[7]


def test_conv1d_and_depthwise(device):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 1, 3, generator=g).to(device)
    x = torch.randn(32, 6, 20, generator=g).to(device)
    geometry = dict(stride=[2], padding=[1], dilation=[2], groups=6)
    t = F.conv1d(x, w, None, **geometry)
    scale = w.abs().amax(dim=(1, 2)) / 3
    out = run(w, None, scale, None, -4, 3, 0, x, t, geometry, iterations=200, lr=1e-2, mode="minibatch")
    assert out[0].shape == w.shape and out[5] <= out[4]
    exact = run(w, None, scale, None, -4, 3, 0, x, t, geometry, iterations=200, lr=1e-2, mode="exact")
    assert exact[5] <= exact[4]


# ---- bad input -------------------------------------------------------------------------------

def _good():
    w = torch.randn(4, 3, 3, 3)
    x = torch.randn(16, 3, 5, 5)
    return dict(w=w, b=None, scale=torch.ones(4) * 0.1, zp=None, n=-8, p=7, axis=0, inputs=x,
                targets=F.conv2d(x, w), geometry={})


@pytest.mark.parametrize(
    "change,options,match",
    [
        (dict(targets=torch.randn(16, 4, 2, 2)), {}, "targets must have shape"),
        (dict(targets=torch.randn(15, 4, 3, 3)), {}, "inputs hold 16 samples but targets hold 15"),
        (dict(inputs=torch.randn(16, 5, 5, 5)), {}, "inputs have 5 channels"),
        (dict(inputs=torch.randn(16, 3, 25)), {}, "inputs must be 4-D"),
        (dict(w=torch.randn(4, 3, 3, 3, 3)), {}, "weight must be 2-D"),
        (dict(geometry=dict(stride=[1, 1, 1])), {}, "stride must have 1 or 2 entries"),
        (dict(geometry=dict(groups=3)), {}, "groups \\(3\\) must divide"),
        (dict(b=torch.zeros(3)), {}, "bias must have shape"),
        ({}, dict(iterations=0), "iterations must be > 0"),
        ({}, dict(batch_size=0), "batch_size must be > 0"),
        ({}, dict(batch_size=17, mode="minibatch"), "batch_size \\(17\\) is larger than the cache"),
        ({}, dict(activation="gelu"), "activation must be one of"),
        ({}, dict(mode="exact", activation="relu"), "mode='exact' needs activation='none'"),
        ({}, dict(mode="fast"), "mode must be one of"),
        ({}, dict(schedule="step"), "schedule must be cosine or linear"),
        (dict(geometry=dict(output_padding=[1])), {}, "output_padding applies to transposed convolutions only"),
        (dict(geometry=dict(transposed=True)), {}, "inputs have 3 channels but weight of shape"),
        (dict(inputs=torch.randn(16, 4, 5, 5), geometry=dict(transposed=True, output_padding=[1])), {},
         "output_padding must be >= 0 and smaller than stride or dilation"),
        (dict(inputs=torch.randn(16, 4, 5, 5), targets=torch.randn(16, 3, 7, 7), geometry=dict(transposed=True)),
         dict(mode="exact"), "mode='exact' is not available for transposed convolutions"),
    ],
)
def test_bad_input(change, options, match):
    a = _good()
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        run(a["w"], a["b"], a["scale"], a["zp"], a["n"], a["p"], a["axis"], a["inputs"], a["targets"],
            a["geometry"], iterations=options.pop("iterations", 5), batch_size=options.pop("batch_size", 4),
            **options)


@pytest.mark.parametrize("which", ["inputs", "targets"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_caches(which, value):
    a = _good()
    a[which] = a[which].clone()
    a[which].view(-1)[7] = value
    with pytest.raises(RuntimeError, match=f"{which} contains NaN or Inf"):
        run(a["w"], a["b"], a["scale"], a["zp"], a["n"], a["p"], a["axis"], a["inputs"], a["targets"],
            iterations=5, batch_size=4)


def test_linear_rejects_conv_arguments():
    w = torch.randn(4, 3)
    x = torch.randn(8, 3)
    with pytest.raises(RuntimeError, match="apply to convolutions only"):
        run(w, None, torch.ones(4), None, -8, 7, 0, x, F.linear(x, w), dict(stride=[2]), iterations=2, batch_size=2)
    with pytest.raises(RuntimeError, match="transposed applies to convolutions only"):
        run(w, None, torch.ones(4), None, -8, 7, 0, x, F.linear(x, w), dict(transposed=True), iterations=2,
            batch_size=2)


@needs_cuda
def test_caches_on_another_device():
    a = _good()
    with pytest.raises(RuntimeError, match="inputs are on cpu but targets are on cuda"):
        run(a["w"].cuda(), None, a["scale"].cuda(), None, -8, 7, 0, a["inputs"], a["targets"].cuda(),
            iterations=2, batch_size=2)
    with pytest.raises(RuntimeError, match="inputs is on cuda:0 but weight is on cpu"):
        run(a["w"], None, a["scale"], None, -8, 7, 0, a["inputs"].cuda(), a["targets"].cuda(),
            iterations=2, batch_size=2)


@needs_cuda
@pytest.mark.parametrize("mode", ["exact", "minibatch"])
def test_caches_streamed_from_pinned_host_memory(mode):
    """A CUDA weight with caches in pinned host memory: exact mode sees the same data as with device
    caches (same result); minibatch mode draws its indices on the host and still learns."""
    w, b, scale, zp, n, p, axis, x, t, geometry = conv_case("cuda", "none")
    options = dict(iterations=300, lr=1e-2, activation="none", mode=mode)
    on_device = run(w, b, scale, zp, n, p, axis, x, t, geometry, **options)
    streamed = run(w, b, scale, zp, n, p, axis, x.cpu().pin_memory(), t.cpu().pin_memory(), geometry, **options)
    assert streamed[0].device.type == "cuda"
    if mode == "exact":
        torch.testing.assert_close(streamed[2], on_device[2], rtol=1e-4, atol=1e-4)
    assert streamed[5] < streamed[4]  # AdaRound below nearest on the cache


@pytest.mark.parametrize("case, mode, activation", [
    (conv_case, "minibatch", "relu"),   # strided, grouped conv: cuDNN forward and weight gradient
    (linear_case, "minibatch", "none"),
    (conv_case, "exact", "none"),       # the W G product of exact mode
])
def test_cuda_graph_gives_the_eager_result(device, case, mode, activation):
    """cuda_graph=True records one iteration and replays it between the logged (eager) iterations;
    1,100 iterations cross a redraw of the minibatch rows (every 1,024). Everything must equal the
    eager run bit for bit, without a fallback warning. On the CPU the option is a no-op."""
    w, b, scale, zp, n, p, axis, x, t, geometry = case(device, activation)
    options = dict(iterations=1100, lr=1e-2, activation=activation, mode=mode, log_every=97)
    eager = run(w, b, scale, zp, n, p, axis, x, t, geometry, cuda_graph=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and runs eagerly: not what is tested
        graphed = run(w, b, scale, zp, n, p, axis, x, t, geometry, cuda_graph=True, **options)
    for name, a, g in zip(("quantized_weight", "codes", "v", "loss_curve"), eager[:4], graphed[:4]):
        assert torch.equal(a, g), name
    assert graphed[6] == eager[6]


def test_caller_float32_precision_settings_are_kept(device):
    """The loop sets cuBLAS/cuDNN float32 precision for itself through PyTorch's per-op API and hands
    the caller's settings back, whatever they were: a program that set TF32 per op (which makes PyTorch
    refuse the legacy allow_tf32 flags) must still be able to run it."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"
        w, b, scale, zp, n, p, axis, x, t, geometry = conv_case(device, "relu")
        run(w, b, scale, zp, n, p, axis, x, t, geometry, iterations=5, activation="relu")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
