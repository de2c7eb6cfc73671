"""Block reconstruction (QuantConfig.reconstruction="block"), QDrop and learned activation steps, against
plain-PyTorch references: autograd + torch.optim.Adam over a written-out block, finite differences, and
the per-layer loop."""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaround_ext as ae
from adaround_ext import blocks as blocks_mod
from adaround_ext import _C
from adaround_ext._ops import optimize_layer
from adaround_ext.activation_ranges import activation_grid
from adaround_ext.encodings import export_encodings
from adaround_ext.onnx_export import export_onnx
from adaround_ext.blocks import BlockLayer, ReconstructionQuantizer, block_module, find_blocks, reconstruct_block
from adaround_ext.modules import ChannelClip, QuantizedLayer, trace
from conftest import needs_cuda


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class TwoBlocks(nn.Module):
    """stem, two residual blocks (found by their additions: not a torchvision class), head."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = ResBlock(c)
        self.block2 = ResBlock(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def two_blocks(seed=0):
    torch.manual_seed(seed)
    return TwoBlocks().eval()


def images(n=48, seed=1, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


FAST = dict(iterations=30, batch_size=8, num_samples=48, progress=False, weight_bits=3, scale_method="minmax")


# ---- finding blocks ---------------------------------------------------------------------------

def layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_blocks_of_torchvision_networks():
    import torchvision

    resnet = torchvision.models.resnet18()
    found = find_blocks(resnet, trace(resnet), layer_names(resnet))
    assert [b.name for b in found] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert found[2].layers == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    mobilenet = torchvision.models.mobilenet_v2()
    found = find_blocks(mobilenet, trace(mobilenet), layer_names(mobilenet))
    # Every InvertedResidual, those without a residual addition (stride 2 or a channel change) too.
    assert [b.name for b in found] == [f"features.{i}" for i in range(1, 18)]


def test_blocks_found_by_their_residual_additions_and_top_level_spans():
    model = two_blocks()
    found = find_blocks(model, trace(model), layer_names(model))
    assert [(b.name, b.layers) for b in found] == [("block1", ["block1.conv1", "block1.conv2"]),
                                                   ("block2", ["block2.conv1", "block2.conv2"])]

    class Flat(nn.Module):  # residuals in the model's own forward: spans of its graph
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(5))

        def forward(self, x):
            x = F.relu(self.a(x))
            x = x + self.b(x)
            x = self.d(F.relu(x)) + self.c(x)  # both paths through a layer: the span starts at the fork
            return self.e(x)

    flat = Flat()
    found = find_blocks(flat, trace(flat), ["a", "b", "d", "c", "e"])
    assert [(b.name, b.layers) for b in found] == [("add", ["b"]), ("add_1", ["d", "c"])]


def test_the_layers_reading_values_their_block_computes():
    """The layers whose input quantizer inner_activations="float" leaves out while a block learns."""
    import torchvision

    for model, name, inner in ((torchvision.models.resnet18(), "layer2.0", ["layer2.0.conv2"]),
                               (torchvision.models.mobilenet_v2(), "features.2",
                                ["features.2.conv.1.0", "features.2.conv.2"]),
                               (two_blocks(), "block1", ["block1.conv2"])):
        block = next(b for b in find_blocks(model, trace(model), layer_names(model)) if b.name == name)
        assert sorted(blocks_mod._reading_block_values(block_module(model, block), set(block.layers))) == inner


def test_named_blocks_and_their_errors():
    model = two_blocks()
    graph, layers = trace(model), layer_names(model)
    assert [b.name for b in find_blocks(model, graph, layers, ["block2"])] == ["block2"]
    with pytest.raises(ValueError, match="block 'nope' is not a module"):
        find_blocks(model, graph, layers, ["nope"])

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x, skip):
            return self.conv(x) + skip

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(4, 4, 1)
            self.inner = TwoInputs()

        def forward(self, x):
            return self.inner(self.first(x), x)

    outer = Outer()
    with pytest.raises(ValueError, match=r"block 'inner' cannot be reconstructed as one block: it reads 2 values"):
        find_blocks(outer, trace(outer), ["first", "inner.conv"], ["inner"])
    with pytest.raises(ValueError, match="block 'inner'"):  # the same error through quantize, naming the block
        ae.quantize(outer, torch.randn(16, 4, 5, 5),
                    ae.QuantConfig(reconstruction="block", blocks=["inner"], activation_bits=None,
                                   **dict(FAST, num_samples=16)))


# ---- the learned rounding against plain PyTorch ------------------------------------------------

def block_setup(dtype=torch.float64, bits=3, seed=0, size=8, variant=None, symmetric=True):
    """block1 of a TwoBlocks model with its cached inputs and float outputs, and its layers' grids
    (symmetric=False: unsigned, with a zero point per channel); variant(block1): another block1 in its place."""
    model = two_blocks(seed)
    if variant is not None:
        model.block1 = variant(model.block1)
    model = model.to(dtype)
    x = images(size=size).to(dtype)
    with torch.no_grad():
        inputs = F.relu(model.stem(x))
        targets = model.block1(inputs)
    n, p = ae.quant_range(bits, symmetric)
    layers = []
    for name in ("block1.conv1", "block1.conv2"):
        conv = model.get_submodule(name)
        w = conv.weight.detach()
        if symmetric:
            scale, zero_point = w.abs().amax(dim=(1, 2, 3)) / p * 0.9, None  # some weights clip
        else:
            lo, hi = w.amin(dim=(1, 2, 3)), w.amax(dim=(1, 2, 3))
            scale = (hi - lo) / (p - n) * 0.9
            zero_point = torch.round(-lo / scale).clamp(n, p)
        layers.append(BlockLayer(name, "conv2d", w, conv.bias.detach(),
                                 dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1), scale, zero_point,
                                 n, p, 0))
    block = find_blocks(model, trace(model), layer_names(model))[0]
    return model, block, layers, inputs, targets


def zero_point_of(layer):
    return 0 if layer.zero_point is None else layer.zero_point.view(-1, 1, 1, 1)


def reference_rounding(model, layers, inputs, targets, config, seed, act_grids=None, drop_all=False):
    """V after each iteration, learned by autograd and torch.optim.Adam over the block written out by hand,
    with the paper's formulas and schedule; act_grids: each conv input's fake-quantization grid."""
    block = model.block1
    bias = [block.conv1.bias.detach(), block.conv2.bias.detach()]
    vs = []
    for layer in layers:
        frac = layer.weight / layer.scale.view(-1, 1, 1, 1)
        frac = frac - torch.floor(frac)
        vs.append(torch.logit((frac + 0.1) / 1.2).clone().requires_grad_())  # h(V) = frac at the start
    adam = torch.optim.Adam(vs, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    rows_gen = torch.Generator().manual_seed(seed)
    warm_end = config.warm_start * config.iterations
    history = []

    def soft_weight(layer, v):
        h = (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1)
        s, z = layer.scale.view(-1, 1, 1, 1), zero_point_of(layer)
        return s * (torch.clamp(torch.floor(layer.weight / s) + z + h, layer.quant_min, layer.quant_max) - z), h

    def quantized(a, i):
        if act_grids is None or drop_all or act_grids[i] is None:
            return a
        scale, zero_point, qmin, qmax = act_grids[i]
        return torch.fake_quantize_per_tensor_affine(a, scale, zero_point, qmin, qmax)

    for t in range(config.iterations):
        rows = torch.randint(len(inputs), (config.batch_size,), generator=rows_gen)
        x, y = inputs[rows], targets[rows]
        (w1, h1), (w2, h2) = soft_weight(layers[0], vs[0]), soft_weight(layers[1], vs[1])
        hidden = F.relu(F.conv2d(quantized(x, 0), w1, bias[0], padding=1))
        out = F.relu(x + F.conv2d(quantized(hidden, 1), w2, bias[1], padding=1))
        loss = (out - y).pow(2).sum() / (config.batch_size * out.shape[2] * out.shape[3])
        if t >= int(warm_end):
            progress = min(max((t - warm_end) / max(1.0, config.iterations - warm_end), 0.0), 1.0)
            beta = config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(math.pi * progress))
            loss = loss + config.reg_lambda * sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in (h1, h2))
        adam.zero_grad()
        loss.backward()
        adam.step()
        history.append([v.detach().clone() for v in vs])
    return history


def recorded_steps(monkeypatch):
    """V of every layer after every rounding step reconstruct_block takes, in order."""
    steps = []
    original = blocks_mod._Rounding.step

    def step(self, *args):
        original(self, *args)
        steps.append(self.v.clone())

    monkeypatch.setattr(blocks_mod._Rounding, "step", step)
    return steps


@pytest.mark.parametrize("activations, size, symmetric", [
    ("float", 8, True), ("quantized", 8, True), ("float", 1, True), ("quantized", 2, True), ("input-quantized", 8, True),
    ("input-quantized", 2, True), ("input-quantized", 8, False), ("float", 2, False)])
def test_block_rounding_equals_plain_pytorch_step_by_step(monkeypatch, activations, size, symmetric):
    """On 1x1 maps the block's 3x3 convolutions learn their centre taps only (the others never see
    data); the codes of the others are the reference's too (its regulariser keeps them nearest).
    On 2x2 maps they run as matrix products over their unfolded inputs (SoftLayer). input-quantized:
    the block's input quantized while it learns, conv2's (a value the block computes) float, as
    inner_activations="auto" resolves without QDrop or learned steps; both quantized at evaluation.
    symmetric=False: the weight grids have zero points."""
    model, block, layers, inputs, targets = block_setup(size=size, symmetric=symmetric)
    inner = "quantized" if activations == "quantized" else "auto"
    config = ae.QuantConfig(iterations=12, batch_size=8, warm_start=0.25, activation_range="minmax",
                            quantized_inputs=activations != "float", activation_bits=4, reconstruction="block",
                            inner_activations=inner)
    assert config.inner_activations_quantized == (activations == "quantized")
    steps = recorded_steps(monkeypatch)
    bits = None if activations == "float" else 4
    result = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=7,
                               activation_bits=bits)
    act_grids = None
    if bits:  # min/max of each conv's float input over the cache, the weights clipped to their grid
        s, z = layers[0].scale.view(-1, 1, 1, 1), zero_point_of(layers[0])
        clipped = s * (torch.clamp(layers[0].weight / s + z, layers[0].quant_min, layers[0].quant_max) - z)
        hidden = F.relu(F.conv2d(inputs, clipped, layers[0].bias, padding=1))
        act_grids = [activation_grid(t.min().item(), t.max().item(), 4) for t in (inputs, hidden)]
        got = [result.input_grids[n] for n in ("block1.conv1", "block1.conv2")]
        assert [v for grid in got for v in grid] == pytest.approx([v for grid in act_grids for v in grid])
    learned_against = act_grids if activations != "input-quantized" else [act_grids[0], None]
    expected = reference_rounding(model, layers, inputs, targets, config, seed=7, act_grids=learned_against)
    assert len(steps) == 2 * config.iterations
    live = (slice(None), slice(None)) + (slice(1, 2) if size == 1 else slice(None),) * 2
    # The matrix-product path sums in another order than the reference's convolution. On 2x2 maps a few
    # elements' first gradients lie near Adam's epsilon (their first step about half the learning rate),
    # where Adam's m / (sqrt(v) + eps) magnifies float64's rounding differences to ~1e-8 in V; a quantized
    # hidden activation absorbs most of them.
    tolerance = 1e-6 if size == 2 and activations != "quantized" else 1e-9
    for t, reference in enumerate(expected):
        for i, v in enumerate(reference):
            torch.testing.assert_close(steps[2 * t + i], v[live], rtol=tolerance, atol=tolerance,
                                       msg=f"iteration {t}, layer {i}")
    # The codes are the learned rounding of the last V.
    for layer, v in zip(layers, expected[-1]):
        h = (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1)
        codes = torch.clamp(torch.floor(layer.weight / layer.scale.view(-1, 1, 1, 1)) + zero_point_of(layer)
                            + (h >= 0.5).double(), layer.quant_min, layer.quant_max)
        assert torch.equal(result.codes[layer.name].double(), codes)
    # The block's error with the learned rounding is the quantized model's: every quantizer acts.
    weights = [layer.scale.view(-1, 1, 1, 1) * (result.codes[layer.name] - zero_point_of(layer)) for layer in layers]
    quantize = (lambda a, i: a) if act_grids is None else (
        lambda a, i: torch.fake_quantize_per_tensor_affine(a, *act_grids[i]))
    hidden = F.relu(F.conv2d(quantize(inputs, 0), weights[0], layers[0].bias, padding=1))
    out = F.relu(inputs + F.conv2d(quantize(hidden, 1), weights[1], layers[1].bias, padding=1))
    error = (out - targets).pow(2).sum().item() / (out.shape[0] * out.shape[2] * out.shape[3])
    assert result.adaround_error == pytest.approx(error, rel=1e-9)


class ClippedResBlock(nn.Module):
    """A ResBlock whose first activation is a ChannelClip (a ReLU6 after cross-layer equalization)."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.conv2, self.relu = block.conv1, block.conv2, block.relu
        self.clip = ChannelClip(torch.linspace(0.05, 0.3, block.conv1.out_channels))

    def forward(self, x):
        return self.relu(x + self.conv2(self.clip(self.conv1(x))))


def test_a_channel_clip_in_a_block_learns_as_through_autograd(monkeypatch):
    """Reconstruction runs a block's ChannelClip with its own gradient (ReconstructionClip): the same
    steps as PyTorch's autograd through the model's ChannelClip, which the model keeps."""
    model, block, layers, inputs, targets = block_setup(variant=ClippedResBlock)
    config = ae.QuantConfig(iterations=12, batch_size=8, warm_start=0.25)
    used, own = [], blocks_mod.ReconstructionClip
    monkeypatch.setattr(blocks_mod, "ReconstructionClip", lambda clip: used.append(clip) or own(clip))
    fast = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=7)
    assert used == [model.block1.clip] and isinstance(model.block1.clip, ChannelClip)
    monkeypatch.setattr(blocks_mod, "ReconstructionClip", lambda clip: clip)
    plain = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=7)
    hidden = model.block1.conv1(inputs)
    upper = model.block1.clip.upper.view(-1, 1, 1)
    assert (hidden > upper).double().mean() > 0.05  # the clip clips
    for name in fast.v:
        torch.testing.assert_close(fast.v[name], plain.v[name], rtol=1e-10, atol=1e-10)
        assert torch.equal(fast.codes[name], plain.codes[name])


class ReadsTheRelu(nn.Module):
    """ResBlock's layers, with the hidden activation's output or input read once more by the residual sum."""

    def __init__(self, block: ResBlock, reads: str, activation: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.relu, self.reads = block.conv1, block.conv2, block.relu, reads
        self.activation = activation

    def forward(self, x):
        h = self.conv1(x)
        r = self.activation(h)
        out = x + self.conv2(r)
        if self.reads == "relu output":
            out = out + r
        if self.reads == "relu input":
            out = out + h
        return self.relu(out)


def halved_relu() -> nn.ReLU:
    relu = nn.ReLU()
    relu.register_forward_hook(lambda module, args, output: output * 0.5)
    return relu


@pytest.mark.parametrize("reads, activation, fused", [
    ("once", nn.ReLU(), True), ("once", nn.ReLU(inplace=True), True), ("once", nn.ReLU6(inplace=True), True),
    ("relu output", nn.ReLU(), False),
    ("relu input", nn.ReLU(), True),  # not in place: the input is unchanged for its other reader
    ("relu input", nn.ReLU(inplace=True), False),  # in place: the other reader sees the clamped values
    ("once", halved_relu(), False),  # a hook changes what the ReLU returns: fusing would lose it
])
def test_a_relu_read_only_by_a_quantized_layer_is_fused_into_its_quantizer(monkeypatch, reads, activation, fused):
    """The activation goes into conv2's input quantizer (a clamp before the grid) only where nothing
    else reads its output, nor, when in place, its input; fused or not, the block learns the same
    rounding bit for bit."""
    model, block, layers, inputs, targets = block_setup(variant=lambda b: ReadsTheRelu(b, reads, activation))
    config = ae.QuantConfig(iterations=8, batch_size=8, activation_range="minmax", activation_bits=4,
                            reconstruction="block", inner_activations="quantized")
    seen = {}
    fuse = blocks_mod._fuse_clamps

    def recording(block_gm, soft_layers):
        fuse(block_gm, soft_layers)
        seen.update(graph=block_gm.graph, soft_layers=soft_layers)

    monkeypatch.setattr(blocks_mod, "_fuse_clamps", recording)
    result = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=7, activation_bits=4)
    conv2 = next(node for node in seen["graph"].nodes if node.target == "block1.conv2")
    assert (conv2.args[0].target == "block1.conv1") == fused
    bounds = (0.0, 6.0) if isinstance(activation, nn.ReLU6) else (0.0, None)
    assert seen["soft_layers"]["block1.conv2"].input_quantizer.clamp == (bounds if fused else (None, None))
    monkeypatch.setattr(blocks_mod, "_fuse_clamps", lambda block_gm, soft_layers: None)
    unfused = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=7,
                                activation_bits=4)
    for name in result.v:
        assert torch.equal(result.v[name], unfused.v[name])
    assert result.adaround_error == unfused.adaround_error


def test_qdrop_extremes(monkeypatch):
    """Drop probability 1: activations stay float, as with no activation quantizer at all; 0: all
    quantized, as the plain reference with quantized activations (the test above); between: differs."""
    model, block, layers, inputs, targets = block_setup()
    common = dict(iterations=10, batch_size=8, activation_bits=4)
    run = lambda **kw: reconstruct_block(block_module(model, block), layers, inputs, targets,
                                         ae.QuantConfig(**common, **kw), seed=3, activation_bits=4 if kw else None)
    floats = reconstruct_block(block_module(model, block), layers, inputs, targets, ae.QuantConfig(**common), seed=3)
    dropped_all = run(reconstruction="block", activation_drop=1.0)
    quantized_all = run(reconstruction="block", quantized_inputs=True, activation_drop=0.0,
                        inner_activations="quantized")
    half = run(reconstruction="block", activation_drop=0.5)
    for name in floats.v:
        assert torch.equal(dropped_all.v[name], floats.v[name])
        assert not torch.equal(quantized_all.v[name], floats.v[name])
        assert not torch.equal(half.v[name], floats.v[name]) and not torch.equal(half.v[name], quantized_all.v[name])


def test_qdrop_keeps_the_given_share_of_elements_in_float():
    x = torch.rand(200, 100) * 3
    q = ReconstructionQuantizer(0.2, 0, 0, 15, learn=False, drop=0.3, generator=torch.Generator().manual_seed(0),
                                device="cpu")
    quantized = torch.fake_quantize_per_tensor_affine(x, 0.2, 0, 0, 15)
    out = q(x)
    kept = (out == x) & (quantized != x)
    assert torch.equal(out[~kept], quantized[~kept])
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(q.eval()(x), quantized)  # at evaluation always quantized


def test_learned_step_receives_the_lsq_gradient():
    """d/ds of the quantizer's output: the straight-through (LSQ) gradient, i.e. the derivative of the
    surrogate that holds at s0 which elements clip and, for the others, the rounding offset
    c = round(x/s0) - x/s0: y(s) = x + s c inside the grid, s (q - z) for a clipped level q. Checked
    against central finite differences of that surrogate and against LSQ's formula."""
    torch.manual_seed(0)
    x = torch.randn(500) * 2
    weights = torch.randn(500, dtype=torch.float64)
    zero_point, n, p = 5, 0, 15
    q = ReconstructionQuantizer(0.3, zero_point, n, p, learn=True, drop=0.0, generator=None, device="cpu")
    output = q(x)
    (weights * output).sum().backward()
    s0, x = q.scale.item(), x.double()  # the float32 step, exactly; the references in float64
    code = torch.round(x / s0) + zero_point
    offsets = torch.round(x / s0) - x / s0
    clipped_level = torch.clamp(code, n, p)
    inside = code == clipped_level

    def surrogate(s):
        return (weights * torch.where(inside, x + s * offsets, s * (clipped_level - zero_point))).sum().item()

    assert surrogate(s0) == pytest.approx((weights * output).sum().item(), rel=1e-6)  # the output at s0
    eps = 1e-6
    finite_difference = (surrogate(s0 + eps) - surrogate(s0 - eps)) / (2 * eps)
    assert q.scale.grad.item() == pytest.approx(finite_difference, rel=1e-5)  # the kernel computes in float32
    lsq = torch.where(inside, offsets, clipped_level - zero_point)
    assert q.scale.grad.item() == pytest.approx((weights * lsq).sum().item(), rel=1e-5)
    assert 0 < (~inside).sum() < len(x) // 2  # both kinds of element are there


@pytest.mark.parametrize("size, stride, groups", [(6, 1, 1), (1, 1, 1), (2, 2, 1), (6, 1, 4)])
def test_a_one_layer_block_learns_what_the_per_layer_loop_learns(size, stride, groups):
    """The same rows, schedule and fused step: the autograd path and the C++ loop agree. On maps
    smaller than the kernel's reach both learn the live taps only and decide the others to nearest;
    grouped convolutions run on channels-last data in the block."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, stride=stride, groups=groups).double()
    model = nn.Sequential(conv)
    inputs = torch.randn(40, 4, size, size, dtype=torch.float64)
    with torch.no_grad():
        # Targets the float weights miss: at W~ = W the gradient would be rounding noise, whose sign
        # Adam's first steps follow, and two convolution algorithms would part from there.
        targets = conv(inputs) + 0.05 * torch.randn(40, 8, *conv(inputs).shape[2:], dtype=torch.float64)
    n, p = ae.quant_range(4)
    scale = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / p
    layer = BlockLayer("0", "conv2d", conv.weight.detach(), conv.bias.detach(),
                       dict(stride=(stride,) * 2, padding=(1, 1), dilation=(1, 1), groups=groups), scale, None, n, p, 0)
    block = find_blocks(model, trace(model), ["0"], ["0"])[0]
    config = ae.QuantConfig(iterations=60, batch_size=8, mode="minibatch")
    result = reconstruct_block(block_module(model, block), [layer], inputs, targets, config, seed=5)
    loop = optimize_layer(conv.weight.detach(), conv.bias.detach(), scale, None, n, p, 0, inputs, targets,
                          stride=(stride,) * 2, padding=(1, 1), groups=groups, seed=5, **config.loop_options())
    torch.testing.assert_close(result.v["0"], loop.v, rtol=1e-6, atol=1e-6)  # float64 sums in other orders
    assert torch.equal(result.codes["0"], loop.codes)


@pytest.mark.parametrize("size, transposed", [(6, False), (1, False), (6, True)])
def test_a_one_layer_block_packs_decided_weights_out_as_the_per_layer_loop_does(monkeypatch, size, transposed):
    """Past the first repacks the per-layer loop steps only the weights whose rounding is decided; the
    frozen V stop where they were packed out, where the full step would have moved them on outward.
    The block packs the same weights at the same iterations, so V itself (not only h(V)) matches; a
    transposed convolution's per-channel grid (axis 1) is packed with its axes swapped, as there."""
    torch.manual_seed(1)
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(4, 8, 3, padding=1).double()
    inputs = torch.randn(40, 4, size, size, dtype=torch.float64)
    with torch.no_grad():
        targets = conv(inputs) + 0.05 * torch.randn_like(conv(inputs))
    n, p = ae.quant_range(4)
    axis = 1 if transposed else 0
    scale = conv.weight.detach().abs().amax(dim=tuple(d for d in range(4) if d != axis)) / p
    geometry = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    if transposed:
        geometry["output_padding"] = (0, 0)
    kind = "conv_transpose2d" if transposed else "conv2d"
    layer = BlockLayer("0", kind, conv.weight.detach(), conv.bias.detach(), geometry, scale, None, n, p, axis)
    model = nn.Sequential(conv)
    block = find_blocks(model, trace(model), ["0"], ["0"])[0]
    config = ae.QuantConfig(iterations=5 * _C.RoundingState.repack_every, batch_size=8, mode="minibatch",
                            warm_start=0.1)
    run = lambda: reconstruct_block(block_module(model, block), [layer], inputs, targets, config, seed=2)  # noqa: E731
    loop = optimize_layer(conv.weight.detach(), conv.bias.detach(), scale, None, n, p, axis, inputs, targets,
                          padding=(1, 1), transposed=transposed, seed=2, **config.loop_options())
    fractions = []
    original_step = blocks_mod._Rounding.step
    monkeypatch.setattr(blocks_mod._Rounding, "step", lambda self, *a: fractions.append(
        self.state.active_fraction) or original_step(self, *a))
    packed = run()
    torch.testing.assert_close(packed.v["0"], loop.v, rtol=1e-6, atol=1e-6)  # float64 sums in other orders
    assert fractions[-1] < 0.9  # the last steps skipped a tenth of the weights or more
    original_init = blocks_mod._Rounding.__init__
    monkeypatch.setattr(blocks_mod._Rounding, "__init__", lambda self, layer, index=None, pack=True:
                        original_init(self, layer, index, pack=False))
    unpacked = run()
    assert torch.equal(unpacked.codes["0"], packed.codes["0"])  # the same rounding decided
    assert (unpacked.v["0"].abs() > packed.v["0"].abs() + 1e-5).any()  # the full step moved frozen V outward


# ---- through quantize() ------------------------------------------------------------------------

def block_config(**kw):
    return ae.QuantConfig(reconstruction="block", activation_bits=8, **dict(FAST, **kw))


def test_block_mode_through_the_pipeline_save_load_encodings_onnx(tmp_path):
    model, x = two_blocks(), images()
    q = ae.quantize(model, x, block_config(activation_drop=0.5, learn_activation_steps=True))
    report = q.adaround_report
    assert [(r.name, r.mode, r.block) for r in report.layers] == [
        ("stem", "minibatch", ""), ("block1.conv1", "block", "block1"), ("block1.conv2", "block", "block1"),
        ("block2.conv1", "block", "block2"), ("block2.conv2", "block", "block2"), ("head", "exact", "")]
    assert "block" in report.table().splitlines()[0].split()
    for r in report.layers:  # every input quantizer was set during the walk: none is calibrated afterwards
        assert q.get_submodule(r.name).input_quantizer is not None and r.input_range is not None
    path = str(tmp_path / "q.pt")
    ae.save_quantized(q, path)
    loaded = ae.load_quantized(model, path)
    assert torch.equal(loaded(x), q(x))
    export_encodings(q, str(tmp_path / "q.encodings"))
    ort = pytest.importorskip("onnxruntime")
    export_onnx(q, x[:2], str(tmp_path / "q.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own arithmetic
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # test_export's tolerance: a last-bit difference now and then moves an activation across a rounding boundary.
    with torch.no_grad():
        expected = q(x)
    assert (torch.from_numpy(out) - expected).abs().max() <= 0.02 * expected.abs().max()


def test_learned_steps_end_in_the_model():
    model, x = two_blocks(), images()
    fixed = ae.quantize(model, x, block_config(quantized_inputs=True))
    learned = ae.quantize(model, x, block_config(learn_activation_steps=True, activation_step_lr=1e-2))
    changed = [n for n in ("block1.conv2", "block2.conv2")
               if learned.get_submodule(n).input_quantizer.scale != fixed.get_submodule(n).input_quantizer.scale]
    assert changed == ["block1.conv2", "block2.conv2"]
    # The stem is reconstructed alone: its input quantizer is calibrated on the images, not learned.
    assert learned.stem.input_quantizer.scale == fixed.stem.input_quantizer.scale
    # With the values the block computes float while it learns, only its input's steps are learned
    # (block1's: block2's quantizers are calibrated on inputs that block1's rounding changed).
    inputs_only = ae.quantize(model, x, block_config(learn_activation_steps=True, activation_step_lr=1e-2,
                                                     inner_activations="float"))
    step = lambda q, n: q.get_submodule(n).input_quantizer.scale  # noqa: E731
    assert step(inputs_only, "block1.conv2") == step(fixed, "block1.conv2")
    assert step(inputs_only, "block1.conv1") != step(fixed, "block1.conv1")


def test_block_mode_without_activations_inside_calibrates_afterwards():
    model, x = two_blocks(), images()
    q = ae.quantize(model, x, block_config(activation_range="minmax"))
    weights_only = copy.deepcopy(q)  # the quantized weights with float activations, as calibration sees them
    for module in weights_only.modules():
        if isinstance(module, QuantizedLayer):
            module.input_quantizer = None
    for name in ("block1.conv1", "block2.conv2"):
        recorded = []
        handle = weights_only.get_submodule(name).register_forward_pre_hook(lambda m, a: recorded.append(a[0]))
        with torch.no_grad():
            weights_only(x)
        handle.remove()
        observed = torch.cat([r.flatten() for r in recorded])
        expected = activation_grid(observed.min().item(), observed.max().item(), 8)[0]
        assert q.get_submodule(name).input_quantizer.scale.item() == pytest.approx(expected, rel=1e-6)


def test_resume_in_the_middle_of_a_block_gives_the_identical_model(tmp_path, monkeypatch):
    model, x = two_blocks(), images()
    config = block_config(activation_drop=0.5, learn_activation_steps=True)
    straight = ae.quantize(model, x, config)

    class Interrupted(Exception):
        pass

    calls = {"n": 0}
    original = blocks_mod._Rounding.step

    def step(self, *args):
        calls["n"] += 1
        if calls["n"] == 2 * config.iterations + 7:  # iteration 3 of block2
            raise Interrupted
        original(self, *args)

    monkeypatch.setattr(blocks_mod._Rounding, "step", step)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        ae.quantize(model, x, config, checkpoint_dir=ckpt)
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".pt")) == ["block.block1.pt", "layer.stem.pt"]
    calls["n"] = -10**9  # no more interruptions; count what the resumed run recomputes
    resumed = ae.quantize(model, x, config, checkpoint_dir=ckpt)
    assert calls["n"] == -10**9 + 2 * config.iterations  # block2 only: block1 came from its checkpoint
    straight_buffers = dict(straight.named_buffers())
    for name, buffer in resumed.named_buffers():
        assert torch.equal(buffer, straight_buffers[name]), name


@pytest.mark.parametrize("options, error, match", [
    (dict(reconstruction="blocks"), ValueError, "reconstruction must be one of layer, block"),
    (dict(activation_drop=0.5), ValueError, "activation_drop needs reconstruction='block'"),
    (dict(learn_activation_steps=True), ValueError, "learn_activation_steps needs reconstruction='block'"),
    (dict(blocks=["block1"]), ValueError, "blocks needs reconstruction='block'"),
    (dict(reconstruction="block", activation_drop=1.5), ValueError, r"activation_drop must be in \[0, 1\]"),
    (dict(reconstruction="block", activation_drop=-0.1), ValueError, r"activation_drop must be in \[0, 1\]"),
    (dict(reconstruction="block", activation_drop=math.nan), ValueError, "activation_drop must be finite"),
    (dict(reconstruction="block", activation_step_lr=0.0), ValueError, "activation_step_lr must be > 0"),
    (dict(reconstruction="block", blocks=[]), ValueError, "blocks must be a non-empty list"),
    (dict(reconstruction="block", rounding="nearest"), ValueError, "reconstruction='block' .* needs rounding='adaround'"),
    (dict(reconstruction="block", blocks=["a", "a"]), ValueError, "blocks names a module twice"),
    (dict(reconstruction="block", blocks="block1"), TypeError, "QuantConfig.blocks must be tuple"),
    (dict(reconstruction="block", learn_activation_steps=True, activation_bits=None), ValueError,
     "need activation_bits"),
    (dict(reconstruction="block", activation_drop=0.5, activation_placement="outputs"), ValueError,
     "need activation_placement='inputs'"),
    (dict(inner_activations="float"), ValueError, "inner_activations needs reconstruction='block'"),
    (dict(reconstruction="block", inner_activations="inside"), ValueError,
     "inner_activations must be one of auto, float, quantized"),
    # Set where no activation quantizer acts while a block learns: it would be ignored.
    (dict(reconstruction="block", activation_bits=8, inner_activations="float"), ValueError,
     "inner_activations='float' needs activation quantizers in the reconstruction"),
    (dict(reconstruction="block", activation_bits=None, inner_activations="quantized"), ValueError,
     "inner_activations='quantized' needs activation quantizers"),
    (dict(reconstruction="block", activation_bits=4, quantized_inputs=False, inner_activations="float"), ValueError,
     "inner_activations='float' needs activation quantizers"),
    (dict(reconstruction="block", learn_activation_steps="yes"), TypeError,
     "QuantConfig.learn_activation_steps must be bool"),
])
def test_block_options_are_validated(options, error, match):
    with pytest.raises(error, match=match):
        ae.QuantConfig(**options)


def test_block_mode_needs_a_traceable_model():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent control flow

    with pytest.raises(ValueError, match="reconstruction='block' needs a model that torch.fx can trace"):
        ae.quantize(Untraceable(), images(8) + 10, block_config(num_samples=8, batch_size=4))


def test_cli_block_options():
    from adaround_testbed.cli import SETTINGS, _setting_options, parse_args

    assert {"w4a4", "w2a4"} <= set(SETTINGS)
    args = parse_args(["--reconstruction", "block", "--activation-bits", "3", "--activation-drop", "0.5",
                       "--learn-activation-steps", "--settings", "w2a4"])
    assert (args.reconstruction, args.activation_bits, args.activation_drop, args.learn_activation_steps) == (
        "block", 3, 0.5, True)
    assert parse_args(["--activation-bits", "none"]).activation_bits is None
    # Combinations QuantConfig refuses fail when the command is parsed, before the model loads.
    for bad in (["--activation-drop", "0.5"], ["--reconstruction", "block", "--activation-drop", "0.5",
                                               "--activation-bits", "none"],
                ["--reconstruction", "block", "--learn-activation-steps", "--settings", "w4-pt"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert parse_args(["--activation-bits", "4"]).activation_bits == 4
    assert parse_args([]).activation_bits == "setting"
    # --quantized-inputs / --no-quantized-inputs, else QuantConfig's default (on at 4-bit activations).
    for flags, w4a4, w4a8 in (([], True, False), (["--quantized-inputs"], True, True),
                              (["--no-quantized-inputs"], False, False)):
        args = parse_args(flags)
        assert [ae.QuantConfig(**_setting_options(args, s)[1]).inputs_quantized for s in ("w4a4", "w4a8")] == [
            w4a4, w4a8], flags
    for bad in ("9", "four"):
        with pytest.raises(SystemExit):
            parse_args(["--activation-bits", bad])
    args = parse_args(["--reconstruction", "block", "--inner-activations", "quantized", "--settings", "w2a4"])
    label, options = _setting_options(args, "w2a4")
    assert ae.QuantConfig(**options).inner_activations_quantized and label.endswith(", blocks, quantized inside")
    for bad in (["--inner-activations", "float"], ["--reconstruction", "block", "--inner-activations", "inside"],
                ["--reconstruction", "block", "--inner-activations", "float", "--settings", "w4a8"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.parametrize("asymmetric", [True, False])
def test_both_cache_strategies_give_the_same_block_caches(asymmetric):
    from adaround_ext.caching import GraphWalkCaches, PrefixCaches, make_layer_caches

    model, x = two_blocks(), images()
    layers = layer_names(model)
    config = ae.QuantConfig(asymmetric_reconstruction=asymmetric, progress=False)
    found = find_blocks(model, trace(model), layers)
    walk = make_layer_caches(model, model, x, config, torch.device("cpu"), layers)
    rerun = make_layer_caches(model, model, x, config, torch.device("cpu"), layers, memory_budget=0)
    assert isinstance(walk, GraphWalkCaches) and isinstance(rerun, PrefixCaches)
    with torch.no_grad():
        block1_input = F.relu(model.stem(x))
        expected = [(block1_input, model.block1(block1_input)),
                    (model.block1(block1_input), model.block2(model.block1(block1_input)))]
    for block, (inputs, outputs) in zip(found, expected):
        for caches in (walk, rerun):
            got_inputs, got_outputs = caches.build_block(block)
            torch.testing.assert_close(got_inputs, inputs, rtol=0, atol=0)
            torch.testing.assert_close(got_outputs, outputs, rtol=0, atol=0)


class FlattenedBlock(nn.Module):
    """Calls .view() across channels and positions, which NHWC strides refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        n, c, h, w = x.shape
        return x + self.conv(x).view(n, -1).softmax(-1).view(n, c, h, w)


def test_block_caches_are_nhwc_on_the_cpu_unless_the_block_calls_view():
    """The CPU block loop runs on NHWC data (blocks.runs_channels_last), cached so; a block whose code calls
    .view() keeps NCHW and is reconstructed."""
    from adaround_ext.caching import make_layer_caches

    x = images()
    flattened = nn.Sequential(FlattenedBlock(), nn.ReLU()).eval()
    for model, nhwc in ((two_blocks(), True), (flattened, False)):
        layers = layer_names(model)
        block = find_blocks(model, trace(model), layers)[0]
        for memory_budget in (None, 0):  # the graph walk, then prefix reruns
            caches = make_layer_caches(model, model, x, ae.QuantConfig(progress=False), torch.device("cpu"), layers,
                                       memory_budget=memory_budget)
            for cache in caches.build_block(block):
                assert cache.is_contiguous(memory_format=torch.channels_last) == nhwc
    q = ae.quantize(flattened, x, ae.QuantConfig(reconstruction="block", activation_bits=None, **FAST))
    assert q.adaround_report.layers[0].block == "0"


class InPlaceBlock(nn.Module):
    """Changes its input in place before its layer reads it (the caches must not see that)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = x.mul_(2)
        return x + self.conv(x)


def test_a_block_that_changes_its_input_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(InPlaceBlock(), nn.ReLU()).eval()
    x = images()
    with torch.no_grad():
        expected = model[0](x.clone())
    block = find_blocks(model, trace(model), ["0.conv"])[0]
    for memory_budget in (None, 0):  # the graph walk, then prefix reruns
        from adaround_ext.caching import make_layer_caches

        caches = make_layer_caches(model, model, x.clone(), ae.QuantConfig(progress=False), torch.device("cpu"),
                                   ["0.conv"], memory_budget=memory_budget)
        inputs, outputs = caches.build_block(block)
        torch.testing.assert_close(inputs, x, rtol=0, atol=0)
        torch.testing.assert_close(outputs, expected, rtol=0, atol=0)
    q = ae.quantize(model, x, ae.QuantConfig(reconstruction="block", activation_bits=None, **FAST))
    report = q.adaround_report.layers[0]
    assert report.block == "0"
    # The reported error is the quantized block's on the true inputs (not on inputs doubled again).
    with torch.no_grad():
        error = (q[0](x.clone()) - expected).pow(2).sum().item() / (x.shape[0] * x.shape[2] * x.shape[3])
    assert report.adaround_error == pytest.approx(error, rel=1e-5)


def test_an_affine_addition_inside_a_block_does_not_make_its_own_block():
    """x * gamma + beta (a parameter, as in ConvNeXt's LayerNorm) is no residual: the block around it is found."""
    class Affine(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.gamma, self.beta = nn.Parameter(torch.ones(c, 1, 1)), nn.Parameter(torch.zeros(c, 1, 1))

        def forward(self, x):
            return x * self.gamma + self.beta

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.norm, self.pw = nn.Conv2d(c, c, 3, padding=1), Affine(c), nn.Conv2d(c, c, 1)

        def forward(self, x):
            return x + self.pw(self.norm(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stage = nn.Conv2d(3, 4, 1), Block(4)

        def forward(self, x):
            return self.stage(self.stem(x))

    net = Net()
    found = find_blocks(net, trace(net), ["stem", "stage.conv", "stage.pw"])
    assert [(b.name, b.layers) for b in found] == [("stage", ["stage.conv", "stage.pw"])]


def test_a_block_ending_in_a_linear_over_tokens_averages_over_tokens():
    """The loss sums over the last (channel) dimension of a Linear's output [N, T, C] and averages over
    samples and tokens, as the per-layer loss does."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(20, 7, 4), torch.randn(20, 7, 3)
    model = nn.Sequential(nn.Linear(4, 3))
    block = find_blocks(model, trace(model), ["0"], ["0"])[0]
    gm = block_module(model, block)
    assert blocks_mod.block_error(gm, inputs, targets, torch.device("cpu"), -1) == pytest.approx(
        ((model(inputs) - targets) ** 2).sum().item() / (20 * 7))


class TokenMLP(nn.Module):
    """x + fc2(relu(fc1(x))) over tokens [N, T, C]: a transformer's MLP block."""

    def __init__(self, c=6, hidden=10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


def test_a_linear_block_over_tokens_with_per_tensor_grids_equals_plain_pytorch():
    torch.manual_seed(0)
    model = nn.Sequential(TokenMLP()).double()
    inputs = torch.randn(30, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        targets = model(inputs)
    n, p = ae.quant_range(3)
    layers = []
    for name in ("0.fc1", "0.fc2"):
        fc = model.get_submodule(name)
        scale = fc.weight.detach().abs().max() / p * 0.9  # one scale per tensor
        layers.append(BlockLayer(name, "linear", fc.weight.detach(), fc.bias.detach(), {}, scale, None, n, p, None))
    block = find_blocks(model, trace(model), ["0.fc1", "0.fc2"])[0]
    config = ae.QuantConfig(iterations=10, batch_size=4, warm_start=0.3)
    result = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=2)

    vs = []
    for layer in layers:
        frac = layer.weight / layer.scale
        vs.append(torch.logit((frac - torch.floor(frac) + 0.1) / 1.2).clone().requires_grad_())
    adam = torch.optim.Adam(vs, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    rows_gen, warm_end = torch.Generator().manual_seed(2), config.warm_start * config.iterations
    for t in range(config.iterations):
        rows = torch.randint(len(inputs), (config.batch_size,), generator=rows_gen)
        x, y = inputs[rows], targets[rows]
        hs = [(torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1) for v in vs]
        w1, w2 = (l.scale * torch.clamp(torch.floor(l.weight / l.scale) + h, n, p) for l, h in zip(layers, hs))
        out = x + F.linear(F.relu(F.linear(x, w1, layers[0].bias)), w2, layers[1].bias)
        loss = (out - y).pow(2).sum() / (config.batch_size * 5)  # summed over channels, averaged over tokens
        if t >= int(warm_end):
            progress = (t - warm_end) / (config.iterations - warm_end)
            beta = config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(math.pi * progress))
            loss = loss + config.reg_lambda * sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in hs)
        adam.zero_grad()
        loss.backward()
        adam.step()
    for layer, v in zip(layers, vs):
        torch.testing.assert_close(result.v[layer.name], v.detach(), rtol=1e-9, atol=1e-9)


def test_block_mode_with_output_quantizers_and_per_tensor_grids(tmp_path):
    """activation_placement="outputs" (quantizers on op outputs, calibrated afterwards) and per-tensor
    grids work in block mode, and the model saves and loads."""
    model, x = two_blocks(), images()
    q = ae.quantize(model, x, block_config(activation_placement="outputs", per_channel=False))
    assert [r.block for r in q.adaround_report.layers] == ["", "block1", "block1", "block2", "block2", ""]
    assert q.adaround_report.activation_ranges  # the output quantizers were calibrated
    assert all(q.get_submodule(r.name).axis is None for r in q.adaround_report.layers)
    path = str(tmp_path / "q.pt")
    ae.save_quantized(q, path)
    with torch.no_grad():
        assert torch.equal(ae.load_quantized(model, path)(x), q(x))


@needs_cuda
@pytest.mark.parametrize("size, symmetric", [(8, True), (1, True), (8, False)])
def test_block_reconstruction_on_cuda_matches_the_cpu(size, symmetric):
    """The block loop on CUDA tensors (cuDNN, the CUDA step kernel; on 1x1 maps the live taps) learns
    what it learns on the CPU, with and without weight zero points."""
    model, block, layers, inputs, targets = block_setup(dtype=torch.float32, size=size, symmetric=symmetric)
    config = ae.QuantConfig(iterations=20, batch_size=8, reconstruction="block", quantized_inputs=True,
                            activation_bits=4, inner_activations="quantized")
    cpu = reconstruct_block(block_module(model, block), layers, inputs, targets, config, seed=1, activation_bits=4)
    gpu_model = copy.deepcopy(model).cuda()
    gpu_layers = [BlockLayer(l.name, l.kind, l.weight.cuda(), l.bias.cuda(), l.geometry, l.scale.cuda(),
                             None if l.zero_point is None else l.zero_point.cuda(), l.quant_min, l.quant_max, l.axis)
                  for l in layers]
    gpu_block = find_blocks(gpu_model, trace(gpu_model), layer_names(gpu_model))[0]
    gpu = reconstruct_block(block_module(gpu_model, gpu_block), gpu_layers, inputs.cuda(), targets.cuda(), config,
                            seed=1, activation_bits=4)
    for name in cpu.v:
        torch.testing.assert_close(gpu.v[name].cpu(), cpu.v[name], rtol=1e-4, atol=1e-4)


def test_half_precision_weights_are_learned_in_float32():
    """Was: the shape pass ran the block with the raw float16 weights on float32 inputs and failed;
    the rounding itself is learned in float32, as the per-layer loop learns it."""
    model, block, layers, inputs, targets = block_setup(dtype=torch.float32)
    half = [BlockLayer(l.name, l.kind, l.weight.half(), l.bias, l.geometry, l.scale, None, l.quant_min,
                       l.quant_max, l.axis) for l in layers]
    config = ae.QuantConfig(iterations=5, batch_size=8)
    result = reconstruct_block(block_module(model, block), half, inputs, targets, config, seed=0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in result.v.values())
