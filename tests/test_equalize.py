"""Cross-layer equalization and high-bias absorption (adaround_ext.equalize) against plain-PyTorch
references: the FP32 function is unchanged, the pairs' ranges end up equal, the scales are
DFQ's sqrt(r1 / r2), and the quantized pipeline, save/load and ONNX export keep it."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import adaround_ext as ae
from adaround_ext.equalize import equalize, find_pairs
from conftest import needs_cuda

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def randomize_batchnorm_(model, seed=0):
    """BatchNorm statistics and affine parameters far from the identity, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) * 3 + 0.05)
            m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model.eval()


class GroupedNet(nn.Module):
    """Conv -> BN -> ReLU -> grouped conv -> ReLU6 -> depthwise conv -> Hardtanh(0, 6) -> 1x1 conv ->
    pooling -> Linear -> ReLU -> Linear: every kind of pair CLE handles."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(24)
        self.relu6 = nn.ReLU6()
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.clip = nn.Hardtanh(0.0, 6.0)
        self.pointwise = nn.Conv2d(24, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 20)
        self.fc_relu = nn.ReLU()
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.clip(self.depthwise(self.relu6(self.bn2(self.grouped(x)))))
        x = self.pool(self.pointwise(x)).flatten(1)
        return self.fc2(self.fc_relu(self.fc1(x)))


def relative_error(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "grouped": GroupedNet,
}


@pytest.mark.parametrize("name", MODELS)
def test_function_unchanged(name):
    torch.manual_seed(0)
    model = randomize_batchnorm_(MODELS[name]())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = equalize(copy.deepcopy(model), bias_absorption=False)(x)
    assert relative_error(out, ref) < 1e-5


def _weight_ranges(model, pair):
    """Per channel between the two layers: (range of the first's output channel, range of the
    second's weights reading it), written out plainly for dense and grouped second layers."""
    first, second = model.get_submodule(pair.first).weight, model.get_submodule(pair.second).weight
    r1 = torch.stack([first[i].abs().max() for i in range(first.shape[0])])
    groups = getattr(model.get_submodule(pair.second), "groups", 1)
    out_per_group, in_per_group = second.shape[0] // groups, second.shape[1]
    r2 = []
    for j in range(first.shape[0]):
        g, local = divmod(j, in_per_group)
        r2.append(second[g * out_per_group:(g + 1) * out_per_group, local].abs().max())
    return r1, torch.stack(r2)


# Pairs by architecture: resnet18 one per BasicBlock (conv1 -> conv2; the block input and output also
# feed the residual path); mobilenet_v2 features.0 -> the first depthwise conv, that block's depthwise ->
# projection and projection -> the next expansion, expansion -> depthwise -> projection in the 16 later
# blocks, and the last projection -> features.18; GroupedNet conv1 -> grouped -> depthwise -> pointwise
# and fc1 -> fc2 (the pooled, flattened conv output is no channel-for-channel path to a Linear).
PAIR_COUNTS = {"resnet18": 8, "mobilenet_v2": 3 + 16 * 2 + 1, "grouped": 4}


@pytest.mark.parametrize("name", MODELS)
def test_pair_ranges_equal_after_convergence(name):
    torch.manual_seed(1)
    model = equalize(randomize_batchnorm_(MODELS[name]()), bias_absorption=False)
    pairs = find_pairs(model)  # found again on the equalized model, its ChannelClips included
    assert len(pairs) == PAIR_COUNTS[name]
    for pair in pairs:
        r1, r2 = _weight_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-7)


def test_scales_are_dfq_formula_and_relu6_bound_follows():
    """One pair (conv -> ReLU6 -> conv): W1[i] / s_i, W2[:, i] * s_i, upper 6 / s_i, s = sqrt(r1 / r2)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 5, 1)).eval()
    w1, b1, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight))
    s = (w1.abs().amax(dim=(1, 2, 3)) / w2.abs().amax(dim=(0, 2, 3))).sqrt()
    equalize(model, bias_absorption=False)
    torch.testing.assert_close(model[0].weight, w1 / s.view(-1, 1, 1, 1))
    torch.testing.assert_close(model[0].bias, b1 / s)
    torch.testing.assert_close(model[2].weight, w2 * s.view(1, -1, 1, 1))
    assert isinstance(model[1], ae.ChannelClip)
    torch.testing.assert_close(model[1].upper, 6 / s)


def test_no_pair_across_a_branch_or_a_shared_layer():
    """A layer whose output also feeds a residual addition is not scaled (the addition would change)."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y) + y

    assert find_pairs(Residual()) == []


def test_no_pair_between_a_conv_and_a_linear_or_with_a_shared_weight():
    """Was: Conv2d -> ReLU -> Linear over the last axis was paired (the channels lie on different axes)
    and the output changed by 96 %; a weight tied to another module was scaled for both."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Linear(8, 5)).eval()
    model[0].weight.data.mul_(torch.logspace(-2, 2, 8).view(-1, 1, 1, 1))
    x = torch.randn(2, 3, 4, 8)
    with torch.no_grad():
        ref = model(x)
        assert find_pairs(copy.deepcopy(model)) == []
        torch.testing.assert_close(equalize(model)(x), ref)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.c.weight = self.b.weight  # b and c share one weight

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    tied = Tied().eval()
    tied.a.weight.data.mul_(torch.logspace(-2, 2, 4).view(-1, 1))
    x = torch.randn(5, 4)
    with torch.no_grad():
        ref = tied(x)
        assert find_pairs(copy.deepcopy(tied)) == []
        torch.testing.assert_close(equalize(tied)(x), ref)


@needs_cuda
def test_equalize_on_cuda_keeps_function():
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.mobilenet_v2(num_classes=10)).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
        out = equalize(copy.deepcopy(model))(x)  # with bias absorption: new tensors on the model's device
    assert out.device == ref.device and relative_error(out, ref) < 1e-2


def test_absorption_through_a_clip_lowers_its_bound():
    """conv -> BN -> ReLU6 -> 1x1 conv with beta - 3 gamma > 0: the clip's bound drops by c with the bias."""
    model = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 4, 1)).eval()
    model[1].weight.data.fill_(0.1)
    model[1].bias.data.copy_(torch.linspace(0.5, 4, 6))
    x = torch.randn(8, 3, 4, 4) * 0.2
    with torch.no_grad():
        ref = model(x)
        plain = equalize(copy.deepcopy(model), bias_absorption=False)
        absorbed = equalize(copy.deepcopy(model), bias_absorption=True)
        torch.testing.assert_close(absorbed(x), ref, rtol=1e-5, atol=1e-5)
    c = plain[0].bias - absorbed[0].bias
    assert (c > 0).sum() >= 3
    torch.testing.assert_close(absorbed[2].upper, plain[2].upper - c)


def test_bias_absorption_matches_dfq_and_keeps_function_where_its_premise_holds():
    """Pre-activation N(beta, gamma^2) with beta > 3 gamma: c = beta - 3 gamma leaves the first layer's
    bias and reaches the second's as W2 c; inputs that keep the pre-activation above c give the same
    output."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    model[1].running_mean.zero_()
    model[1].running_var.fill_(1.0)
    model[1].weight.data.fill_(0.1)
    model[1].bias.data.copy_(torch.linspace(-1, 5, 6))
    x = torch.randn(8, 3, 4, 4) * 0.2  # conv output stays within +-3 stddev of the BN statistics
    with torch.no_grad():
        ref = model(x)
        plain = equalize(copy.deepcopy(model), bias_absorption=False)
        absorbed = equalize(copy.deepcopy(model), bias_absorption=True)
        torch.testing.assert_close(absorbed(x), ref, rtol=1e-5, atol=1e-5)
    # Reference: c in the equalized model's units (the BN's beta and gamma divided by the channel scale).
    s = model[0].weight.abs().amax(dim=(1, 2, 3)) * 0.1 / (1 + 1e-5) ** 0.5 / model[3].weight.abs().amax(dim=(0, 2, 3))
    s = s.sqrt()
    c = ((model[1].bias - 3 * model[1].weight.abs()) / s).clamp(min=0)
    assert (c > 0).sum() >= 3
    torch.testing.assert_close(plain[0].bias - absorbed[0].bias, c.detach(), rtol=1e-4, atol=1e-6)
    shift = (plain[3].weight.sum(dim=(2, 3)) * c).sum(dim=1)
    torch.testing.assert_close(absorbed[3].bias - plain[3].bias, shift.detach(), rtol=1e-4, atol=1e-5)


def test_no_absorption_into_a_padded_layer():
    """A padded second layer would see 0 at its border where the shifted input is -c: nothing moves."""
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    model[1].bias.data.fill_(5.0)
    model[1].weight.data.fill_(0.1)
    plain = equalize(copy.deepcopy(model), bias_absorption=False)
    absorbed = equalize(copy.deepcopy(model), bias_absorption=True)
    torch.testing.assert_close(absorbed[0].bias, plain[0].bias)
    torch.testing.assert_close(absorbed[3].bias, plain[3].bias)


@st.composite
def grouped_pairs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    mid = groups * draw(st.integers(1, 4))
    out = groups * draw(st.integers(1, 3))
    activation = draw(st.sampled_from([nn.Identity, nn.ReLU, nn.ReLU6]))
    k1, k2 = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**16))
    return groups, mid, out, activation, k1, k2, seed


@given(grouped_pairs())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
def test_property_any_grouped_pair_keeps_function(case):
    groups, mid, out, activation, k1, k2, seed = case
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, mid, k1, padding=k1 // 2), activation(),
                          nn.Conv2d(mid, out, k2, padding=k2 // 2, groups=groups)).eval()
    with torch.no_grad():  # channel ranges spread over four decades, as after BN folding
        model[0].weight.mul_(torch.logspace(-2, 2, mid).view(-1, 1, 1, 1))
        x = torch.randn(3, 2, 6, 6)
        ref = model(x)
        out_eq = equalize(model)(x)
    assert relative_error(out_eq, ref) < 1e-5


def toy_depthwise_model():
    """A depthwise model whose folded channels' ranges differ by 10^3."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1)).eval()
    model[1].weight.data.copy_(torch.logspace(-2, 1, 8))
    model[4].weight.data.copy_(torch.logspace(1, -2, 8))
    return model


TOY_CONFIG = dict(weight_bits=4, activation_bits=None, per_channel=False, rounding="nearest", progress=False)


@pytest.fixture(scope="module")
def equalized_toy():
    model, calib = toy_depthwise_model(), torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    return model, ae.quantize(model, calib, ae.QuantConfig(cross_layer_equalization=True, **TOY_CONFIG)), calib


def test_quantize_with_equalization_recovers_a_per_tensor_grid(equalized_toy):
    """At W4 per-tensor nearest, CLE lowers the output error of the toy model."""
    model, equalized, calib = equalized_toy
    with torch.no_grad():
        ref = model(calib)
        plain = ae.quantize(model, calib, ae.QuantConfig(**TOY_CONFIG))
        error_plain = (plain(calib) - ref).pow(2).mean()
        error_equalized = (equalized(calib) - ref).pow(2).mean()
    assert error_equalized < 0.5 * error_plain
    assert equalized.adaround_channel_clips == ["2", "5"]
    # Was "none": fx traced through the ChannelClips, and the loss lost the activation after each conv.
    assert [r.loss_activation for r in equalized.adaround_report.layers] == ["relu", "relu", "none"]


def test_equalized_model_saves_and_loads(equalized_toy, tmp_path):
    _, equalized, calib = equalized_toy
    ae.save_quantized(equalized, str(tmp_path / "q.pt"))
    loaded = ae.load_quantized(toy_depthwise_model(), str(tmp_path / "q.pt"))
    assert isinstance(loaded[2], ae.ChannelClip)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib), equalized(calib))


def test_equalized_model_exports_to_onnx(equalized_toy, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from adaround_ext.onnx_export import export_onnx

    _, equalized, calib = equalized_toy
    export_onnx(equalized, calib[:2], str(tmp_path / "q.onnx"))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: calib[:4].numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), equalized(calib[:4]), rtol=1e-4, atol=1e-4)


def test_bad_input_is_named():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.a(x)
            return x

    with pytest.raises(ValueError, match="torch.fx"):
        equalize(Untraceable())
    with pytest.raises(ValueError, match="iterations"):
        equalize(nn.Sequential(nn.Conv2d(3, 3, 1)), iterations=0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model[2].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        equalize(model)
    with pytest.raises(TypeError, match="cross_layer_equalization"):
        ae.QuantConfig(cross_layer_equalization="yes")
