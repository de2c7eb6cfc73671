"""Block reconstruction (docs/algorithm.md#block-reconstruction): the rounding of every Conv/Linear of a
residual block learned jointly against the block's float output (BRECQ), optionally with the block's
activation quantizers in the loop: QDrop (each element keeps its float value with probability
activation_drop) and step sizes learned with the LSQ gradient.

The block runs as a torch.fx GraphModule cut out of the model's traced graph, with each layer replaced
by a SoftLayer, under PyTorch autograd; each layer's rounding state is the per-layer loop's own
(_C.RoundingState, C++ ActiveWeights), stepped by the same fused step from the loop's schedule table,
with the weights whose rounding is decided packed out of the step on the CPU as there.
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import _C
from ._ops import _compute_dtype, channel_clip, fake_quantize_activation, hard_quantize, init_v, rectified_sigmoid
from .activation_ranges import RangeObserver, activation_grid
from .layer_kinds import LAYER_KINDS
from .live_taps import live_window
from .modules import ChannelClip, set_submodule

log = logging.getLogger("adaround_ext")

# Module classes that are residual blocks by name (torchvision's), found even without an addition
# (a MobileNetV2 InvertedResidual with a stride or a channel change has none).
BLOCK_TYPES = ("BasicBlock", "Bottleneck", "InvertedResidual")
_ADDS = (operator.add, operator.iadd, torch.add)
EVAL_CHUNK = 128  # samples per forward when the errors are measured on the whole cache
# Output positions per sample up to which a 1x1 convolution on NCHW data runs as a matrix product
# (over a copy of its rows): where optimize_layer's unfolded GEMM path runs small maps.
LINEAR_MAX_POSITIONS = _C.gemm_max_positions
# ... and up to which a larger kernel does, over its unfolded input: the unfolding and its gradient
# (a scatter back onto the map) cost more than they save from 16 positions on (benchmarks/README.md).
UNFOLDED_MAX_POSITIONS = 4


@dataclass
class Block:
    """A reconstruction unit: graph nodes [first, last] of the traced model, read from one outside
    value (`input_node`) and read outside only through the last node."""
    name: str  # the module's name, or for a span of the top-level graph the name of its closing addition
    layers: List[str]
    first: int
    last: int
    input_node: fx.Node
    nodes: List[fx.Node] = field(repr=False, default_factory=list)
    input_index: int = -1  # the position of input_node in the graph (the same in every trace of the model)
    is_module: bool = True  # a module of the model, rather than a span of the top-level graph


def _owners(node: fx.Node) -> List[str]:
    """The modules whose forward the node ran in, outermost first (a reused module's "@k" suffix dropped)."""
    return [key.split("@")[0] for key in node.meta.get("nn_module_stack", {})]


def _is_residual_add(node: fx.Node) -> bool:
    """An addition of two computed values (not of a parameter, a buffer or a size)."""
    adds = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    computed = lambda a: isinstance(a, fx.Node) and a.op != "get_attr" and not (  # noqa: E731
        a.op == "call_method" and a.target == "size") and not (a.op == "call_function" and a.target is getattr)
    return adds and len(node.args) >= 2 and computed(node.args[0]) and computed(node.args[1])


def _computes(node: fx.Node) -> bool:
    return node.op in ("call_module", "call_function", "call_method")


def _span(name: str, nodes: List[fx.Node], first: int, last: int, layers: set) -> "Block | str":
    """The Block over nodes[first..last], or why it cannot be one."""
    members = [n for n in nodes[first:last + 1] if _computes(n)]
    inside = set(members)
    outside_inputs = {a for n in members for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    if len(outside_inputs) != 1:
        return f"it reads {len(outside_inputs)} values from outside it (one is needed)"
    read_outside = [n for n in members if any(u not in inside for u in n.users)]
    if read_outside != [nodes[last]]:
        return "values other than its output are read outside it"
    block_layers = [n.target for n in members if n.op == "call_module" and n.target in layers]
    if not block_layers:
        return "it holds no quantized layer"
    input_node = next(iter(outside_inputs))
    return Block(name, block_layers, first, last, input_node, members, nodes.index(input_node))


def find_blocks(model: nn.Module, graph: fx.Graph, layers: Sequence[str],
                names: Optional[Sequence[str]] = None) -> List[Block]:
    """The blocks of the model, in execution order. `names`: the blocks' module names, each of which
    must form a block (else ValueError naming it). Without names: every torchvision BasicBlock,
    Bottleneck and InvertedResidual, the innermost module around each residual addition that forms a
    block, and, for an addition in the top-level forward, the shortest span of the graph from where the
    residual forks to the addition. A found module that cannot be a block (e.g. it reads two outside
    values) leaves its layers to the layer walk."""
    nodes = list(graph.nodes)
    modules = dict(model.named_modules())
    layers = set(layers)
    user_given = names is not None

    def module_block(name):
        """The Block of module `name`, or why it cannot be one."""
        inside = [i for i, n in enumerate(nodes) if _computes(n) and (
            name in _owners(n) or (n.op == "call_module" and (n.target == name or n.target.startswith(name + "."))))]
        if not inside:
            return "it is not called by the model's forward"
        if any(_computes(nodes[j]) for j in set(range(inside[0], inside[-1] + 1)) - set(inside)):
            return "its nodes are interleaved with others in the traced graph"
        return _span(name, nodes, inside[0], inside[-1], layers)

    if user_given:
        blocks = []
        for name in names:
            if name not in modules:
                raise ValueError(f"block {name!r} is not a module of the model")
            block = module_block(name)
            if not isinstance(block, Block):
                raise ValueError(f"block {name!r} cannot be reconstructed as one block: {block}")
            blocks.append(block)
    else:
        tried = {}
        for name, module in modules.items():
            if type(module).__name__ in BLOCK_TYPES:
                tried[name] = module_block(name)
                if not isinstance(tried[name], Block):
                    log.info("module %s is not reconstructed as a block (%s); its layers are reconstructed one by "
                             "one", name, tried[name])
        for node in nodes:  # the innermost module around each residual addition that makes a block
            for owner in reversed(_owners(node) if _is_residual_add(node) else []):
                if owner not in tried:
                    tried[owner] = module_block(owner)
                if isinstance(tried[owner], Block):
                    break
        valid = {name: block for name, block in tried.items() if isinstance(block, Block)}
        # The finest blocks: a module that holds another block leaves it as its own block.
        blocks = [block for name, block in valid.items()
                  if not any(other.startswith(name + ".") for other in valid)]
        blocks += _top_level_spans(nodes, blocks, layers)
    blocks.sort(key=lambda b: b.first)
    for a, b in zip(blocks, blocks[1:]):
        if b.first <= a.last:
            raise ValueError(f"blocks {a.name!r} and {b.name!r} overlap")
    return blocks


def _top_level_spans(nodes: List[fx.Node], blocks: List[Block], layers: set) -> List[Block]:
    """Blocks for residual additions outside every module: the shortest span of the graph that ends
    at the addition, reads one outside value (where the residual path forks) and holds a quantized
    layer, starting no earlier than the end of the previous block or such span."""
    spans, start = [], 0
    for i, node in enumerate(nodes):
        if not (_is_residual_add(node) and not _owners(node)):
            continue
        start = max([start] + [b.last + 1 for b in blocks if b.last < i])
        if any(b.first <= i <= b.last for b in blocks):
            continue
        span = None
        for first in range(i, start - 1, -1):  # widened one node at a time: the first valid span is the shortest
            if _computes(nodes[first]):
                candidate = _span(node.name, nodes, first, i, layers)
                if isinstance(candidate, Block):
                    span = candidate
                    break
        if span is None:
            log.info("the residual addition %s starts no block (no span up to it reads one value)", node.name)
            continue
        span.is_module = False
        spans.append(span)
        start = i + 1
    return spans


def block_module(model: nn.Module, block: Block) -> fx.GraphModule:
    """The block as a GraphModule of one input. Its submodules are the model's own objects, but setting
    one (set_submodule on the result) leaves the model as it was."""
    graph = fx.Graph()
    env = {block.input_node: graph.placeholder("block_input")}

    def value(node):
        if node not in env:  # a parameter or buffer read by the block (get_attr), possibly defined before it
            env[node] = graph.node_copy(node, value)
        return env[node]

    for node in block.nodes:
        env[node] = graph.node_copy(node, value)
    graph.output(env[block.nodes[-1]])
    return fx.GraphModule(model, graph)


# ---- the modules of a block under reconstruction --------------------------------------------

class ReconstructionQuantizer(nn.Module):
    """A layer's per-tensor input quantizer during block reconstruction: fake quantization on the
    grid (scale, zero_point, quant_min, quant_max), the scale learnable (LSQ gradient), and with QDrop
    each element kept in float with probability `drop` while training. `clamp` (lower, upper; None:
    unbounded) is a ReLU or ReLU6 in front of it that reconstruction fused in (_fuse_clamps): one
    pass over the activation each way instead of two."""

    def __init__(self, scale: float, zero_point: int, quant_min: int, quant_max: int, learn: bool, drop: float,
                 generator: Optional[torch.Generator], device):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(scale)], device=device), requires_grad=learn)
        self.register_buffer("zero_point", torch.tensor([float(zero_point)], device=device))
        self.quant_min, self.quant_max, self.learn, self.drop = int(quant_min), int(quant_max), learn, float(drop)
        self.generator = generator
        self.clamp = (None, None)

    def forward(self, x):
        drop, seed = 0.0, 0
        if self.training and self.drop > 0.0:  # the op draws the elements from the seed (on the CPU: no sync)
            drop, seed = self.drop, int(torch.randint(2**62, (), generator=self.generator))
        scale = self.scale if self.learn else self.scale.detach()
        return fake_quantize_activation(x, scale, self.zero_point, self.quant_min, self.quant_max, *self.clamp,
                                        drop, seed)

    def grid(self):
        """(scale, zero_point, quant_min, quant_max) of the ActivationQuantizer this one becomes."""
        return self.scale.item(), int(self.zero_point.item()), self.quant_min, self.quant_max


class SoftLayer(nn.Module):
    """A Conv/Linear of the block computed with `weight` (set before each forward: the soft weight W~,
    or hard weights to measure the error), after its input quantizer, if any. A convolution whose
    kernel reaches past its input runs over its live taps only (live_taps.py): `weight` and
    `geometry` are then those of the cropped convolution."""

    def __init__(self, kind: str, bias: Optional[torch.Tensor], geometry: dict):
        super().__init__()
        self.kind, self.bias, self.geometry = kind, bias, geometry
        self.weight: Optional[torch.Tensor] = None
        self.input_quantizer: Optional[nn.Module] = None
        self.observer: Optional[RangeObserver] = None  # set while the input ranges are calibrated

    def forward(self, x):
        if self.observer is not None:
            self.observer.observe(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight
        if self.kind == "conv2d" and x.is_cpu and _runs_as_matrix_product(x, weight, self.geometry):
            # On small maps a dense convolution is cheaper, forward and backward, as a matrix product over
            # the rows of its unfolded input: no convolution setup. Its output is NHWC in memory (as a
            # grouped convolution's), so a .view() of it in the model's code after the layer would refuse.
            rows = _unfolded_rows(x, weight.shape[2:], self.geometry["stride"], self.geometry["padding"])
            return F.linear(rows, weight.permute(0, 2, 3, 1).flatten(1), self.bias).permute(0, 3, 1, 2)
        if self.kind == "conv2d" and x.is_cpu and _covers_its_map_per_channel(x, weight, self.geometry):
            # One output position per channel and sample (a depthwise kernel over its whole map, as in
            # MobileNetV2's last blocks once cropped to their live taps): a per-channel weighted sum in
            # two elementwise ops each way, where a convolution's setup would cost several times more.
            out = (x * weight.squeeze(1)).sum((2, 3), keepdim=True)
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        if self.kind == "conv2d" and self.geometry["groups"] > 1 and x.is_cpu:
            # oneDNN's grouped (depthwise) convolutions run several times faster on NHWC data (the
            # output stays NHWC, so the layers after it run on NHWC too).
            x, weight = x.contiguous(memory_format=torch.channels_last), weight.contiguous(
                memory_format=torch.channels_last)
            return GroupedConv2d.apply(x, weight, self.bias, self.geometry)
        return LAYER_KINDS[self.kind].apply(x, weight, self.bias, **self.geometry)


def _runs_as_matrix_product(x, weight, geometry) -> bool:
    """Whether an ungrouped, undilated 2-D convolution runs as a matrix product: a 1x1, stride-1,
    unpadded one on NHWC data (its rows are the input's, no copy), or on up to LINEAR_MAX_POSITIONS
    output positions per sample; any other on up to UNFOLDED_MAX_POSITIONS."""
    if geometry["groups"] != 1 or tuple(geometry["dilation"]) != (1, 1):
        return False
    stride, padding, kernel = tuple(geometry["stride"]), tuple(geometry["padding"]), tuple(weight.shape[2:])
    positions = math.prod((size + 2 * p - k) // s + 1 for size, k, s, p in zip(x.shape[2:], kernel, stride, padding))
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return positions <= LINEAR_MAX_POSITIONS or x.is_contiguous(memory_format=torch.channels_last)
    return positions <= UNFOLDED_MAX_POSITIONS


def _covers_its_map_per_channel(x, weight, geometry) -> bool:
    """Whether a 2-D convolution is depthwise (one filter per input channel), unpadded and
    undilated, with its kernel the size of its input map: one output position, whatever the stride."""
    return (geometry["groups"] == x.shape[1] == weight.shape[0] and weight.shape[1] == 1
            and tuple(geometry["padding"]) == (0, 0) and tuple(geometry["dilation"]) == (1, 1)
            and tuple(x.shape[2:]) == tuple(weight.shape[2:]))


def _unfolded_rows(x, kernel, stride, padding) -> torch.Tensor:
    """[n, H_out, W_out, kh * kw * C]: each output position's input taps, tap-major and channel-minor
    (the order of weight.permute(0, 2, 3, 1)); a view of NHWC data for a 1x1, stride-1, unpadded
    kernel."""
    if tuple(padding) != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    x = x.permute(0, 2, 3, 1)
    if tuple(kernel) == (1, 1) and tuple(stride) == (1, 1):
        return x
    # [n, H_out, W_out, C, kh, kw] windows -> taps before channels
    windows = x.unfold(1, kernel[0], stride[0]).unfold(2, kernel[1], stride[1])
    return windows.permute(0, 1, 2, 4, 5, 3).flatten(3)


class GroupedConv2d(torch.autograd.Function):
    """F.conv2d of a grouped convolution whose weight gradient, for a depthwise convolution on a small
    CPU map, is the per-layer loop's direct sum (_C.depthwise_weight_grad) rather than the library's,
    whose per-call setup a few positions per sample do not amortise."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        return F.conv2d(x, weight, bias, **geometry)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        direct = need_w and _C.direct_depthwise_grad_applies(grad, x, g["groups"])
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, g["stride"], g["padding"], g["dilation"],
            False, [0, 0], g["groups"], [need_x, need_w and not direct, need_b])
        if direct:
            grad_w = _C.depthwise_weight_grad(grad, x, weight.shape[2:], g["stride"], g["padding"], g["dilation"])
        return grad_x, grad_w, grad_b, None


class ReconstructionClip(nn.Module):
    """A ChannelClip (a ReLU6 after cross-layer equalization) of a block under reconstruction: the
    same values by torch.ops.adaround.channel_clip, one pass each way with its autograd in C++, where
    the ChannelClip's clamp and torch.minimum take two passes forward and, splitting ties, several over
    boolean tensors backward. Only the ties' gradients differ (the op passes none)."""

    def __init__(self, clip: ChannelClip):
        super().__init__()
        self.upper, self.channel_dim = clip.upper, clip.channel_dim

    def forward(self, x):
        return channel_clip(x, self.upper, self.channel_dim)


@dataclass
class BlockLayer:
    """One layer of a block: its float weight and bias, kind, geometry and weight grid."""
    name: str
    kind: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    geometry: dict
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    quant_min: int
    quant_max: int
    axis: Optional[int]


@dataclass
class BlockResult:
    codes: Dict[str, torch.Tensor]
    v: Dict[str, torch.Tensor]
    input_grids: Dict[str, tuple]  # layer: (scale, zero_point, quant_min, quant_max), with activations inside
    nearest_error: float
    adaround_error: float
    undecided_fraction: Dict[str, float]
    loss_curve: torch.Tensor
    seconds: float = 0.0


class _Rounding:
    """One layer's rounding state, the per-layer loop's own (_C.RoundingState: V, Adam's moments and
    W~, stepped by the fused step, frozen weights packed out of it on the CPU), over the layer's live
    taps (`index`; None: the whole weight)."""

    def __init__(self, layer: BlockLayer, index=None, pack: bool = True):
        self.layer, self.index = layer, index
        dtype = _compute_dtype(layer.weight.dtype)
        self.full_weight = layer.weight.detach().to(dtype)
        w = self.full_weight if index is None else self.full_weight[index]
        self.weight = w = w.contiguous()
        self.zero_point = (torch.zeros_like(layer.scale) if layer.zero_point is None else layer.zero_point).to(dtype)
        self.scale = layer.scale.to(dtype)
        # The state packs by channel, outermost: a per-channel grid on axis 1 (a transposed
        # convolution's) is learned with axes 0 and 1 swapped, as optimize_layer learns it.
        self.swapped = layer.axis is not None and layer.axis % w.dim() == 1
        learned = w.transpose(0, 1).contiguous() if self.swapped else w
        self.state = _C.RoundingState(learned, self.scale, self.zero_point, layer.quant_min, layer.quant_max,
                                      0 if self.swapped else layer.axis, pack)
        self.nearest = hard_quantize(w, self.scale, self.zero_point, layer.quant_min, layer.quant_max, layer.axis,
                                     "nearest")[1]

    def _unswap(self, t):
        return t.transpose(0, 1) if self.swapped else t

    @property
    def v(self):
        return self._unswap(self.state.v).contiguous()

    @property
    def soft(self):
        return self._unswap(self.state.soft_weight)

    def step(self, grad, scalars, numbers, lr, adam, t):
        """Iteration t's step: `scalars` is the schedule table's row t on the weights' device, `numbers`
        its reg_lambda and beta. A state that packs (on the CPU) takes the numbers, as optimize_layer's
        CPU loop does; the others read the row from memory, as its device loop does."""
        grad = self._unswap(grad).contiguous()
        if self.state.can_pack:
            self.state.step(grad, *numbers, lr, *adam, t + 1)
        else:
            self.state.step_scheduled(grad, scalars, lr, *adam)

    def hard(self, v=None, weight=None):
        """(codes, dequantized weight) of the learned rounding, over the live taps."""
        return hard_quantize(self.weight if weight is None else weight, self.scale, self.zero_point,
                             self.layer.quant_min, self.layer.quant_max, self.layer.axis, "adaptive",
                             v=self.v if v is None else v)

    def full_v(self):
        """V of the whole weight: the learned V at the live taps; the dead taps, which never see data,
        decided on the nearest side (ties up), as optimize_layer's unfolded CPU path decides the columns
        it does not learn (its other paths let the regulariser alone decide them, to the same codes)."""
        if self.index is None:
            return self.v
        v = torch.full_like(self.full_weight, _C.saturated_v)
        v.masked_fill_(init_v(self.full_weight, self.scale, self.layer.axis) < 0, -_C.saturated_v)
        v[self.index] = self.v
        return v


def runs_channels_last(nodes: Iterable[fx.Node], device) -> bool:
    """Whether the block runs on channels-last (NHWC) data: on the CPU, where oneDNN's convolutions
    take it without reordering, the quantizers keep it, the grouped convolutions and the 1x1 matrix
    products (SoftLayer) need it, and their gradients come back in it, so that no pass converts a
    layout either way. Not where the block's code (`nodes`) calls .view(), which NHWC strides may refuse."""
    return device.type == "cpu" and not any(n.op == "call_method" and n.target == "view" for n in nodes)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor laid out NHWC (itself when it is); other tensors as they are."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def output_positions(output: torch.Tensor, channel_dim: int) -> int:
    """Output positions per sample: the loss sums over channels (dim 1 after a convolution, the last
    after a Linear, which may run over tokens) and averages over samples and positions, as the
    per-layer loss does."""
    return output[0].numel() // output.shape[channel_dim] if output.dim() > 1 else 1


@contextlib.contextmanager
def full_precision():
    """IEEE float32 matrix products and convolutions with deterministic cuDNN algorithms, as
    optimize_layer runs (csrc/loop/backend_flags.h): the same numbers on every run of a seed."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True,
                                        allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def reconstruct_block(block_gm: fx.GraphModule, layers: List[BlockLayer], inputs: torch.Tensor,
                      targets: torch.Tensor, config, seed: int, activation_bits: Optional[int] = None,
                      progress: Optional[str] = None) -> BlockResult:
    """Learns the rounding of `layers` (the block's Conv/Linear layers, by their names in block_gm)
    against `targets` (the float block's output) on `inputs` (x^). With `activation_bits`, each layer's
    input quantizer is calibrated on the block's float activations (config.activation_range) and takes
    part, with config.activation_drop and config.learn_activation_steps (those of the values the block
    computes only with config.inner_activations quantized). Minibatch rows are drawn as
    the per-layer loop draws them for `seed`."""
    with full_precision():
        return _reconstruct(block_gm, layers, inputs, targets, config, seed, activation_bits, progress)


def _reconstruct(block_gm, layers, inputs, targets, config, seed, activation_bits, progress) -> BlockResult:
    t0 = time.perf_counter()
    device = layers[0].weight.device
    channel_dim = 1 if LAYER_KINDS[layers[-1].kind].is_conv else -1
    for name, cache in (("input", inputs), ("output", targets)):
        if not torch.isfinite(cache).all():
            raise ValueError(f"its cached {name} holds NaN or Inf (an earlier layer's output overflowed float32)")
    if runs_channels_last(block_gm.graph.nodes, device):  # the pipeline's caches already are (caching.py)
        inputs, targets = (channels_last(t) for t in (inputs, targets))
    soft_layers = {}
    for layer in layers:
        soft_layers[layer.name] = SoftLayer(layer.kind, layer.bias, layer.geometry)
        set_submodule(block_gm, layer.name, soft_layers[layer.name])
    for name, module in list(block_gm.named_modules()):
        if isinstance(module, ChannelClip):
            set_submodule(block_gm, name, ReconstructionClip(module))
    windows = _live_windows(block_gm, soft_layers, layers, inputs, device)
    states = {layer.name: _Rounding(layer, windows[layer.name][0] if layer.name in windows else None)
              for layer in layers}
    for name, (_, geometry) in windows.items():
        soft_layers[name].geometry = geometry
    _set_weights(soft_layers, {n: s.soft for n, s in states.items()})
    quantizers, kept_float = {}, set()
    if activation_bits is not None:
        quantizers = _calibrated_quantizers(block_gm, soft_layers, inputs, config, activation_bits, seed, device)
        if not config.inner_activations_quantized:  # in the loop: the block input's quantizers only
            kept_float = _reading_block_values(block_gm, soft_layers)
            for name in kept_float:
                soft_layers[name].input_quantizer = None
        _fuse_clamps(block_gm, soft_layers)
    block_gm.eval()  # the float block's own modules (dropout) as they computed the targets
    for quantizer in quantizers.values():
        quantizer.train()  # QDrop draws while learning; evaluation quantizes every element

    n = inputs.shape[0]
    options = config.loop_options()
    host_table = _C.schedule_table(**options)
    table = host_table.to(device)
    adam = _C.adam_constants
    rows_generator = torch.Generator().manual_seed(seed)  # the per-layer loop's rows for the same seed
    scales = [q.scale for name, q in quantizers.items() if q.learn and name not in kept_float]
    step_optimizer = torch.optim.Adam(scales, lr=config.activation_step_lr) if scales else None
    iterations, log_every = config.iterations, max(1, config.iterations // 100)
    curve = torch.zeros((iterations + log_every - 1) // log_every)
    bar = _bar(progress, iterations)
    try:
        for t in range(iterations):
            if t > 0 and t % _C.RoundingState.repack_every == 0:  # before the iteration, as optimize_layer
                for state in states.values():
                    state.state.repack()
            rows = torch.randint(n, (config.batch_size,), generator=rows_generator)
            x = inputs[rows.to(inputs.device)].to(device, non_blocking=True)
            y = targets[rows.to(targets.device)].to(device, non_blocking=True)
            weights = {name: s.soft.detach().requires_grad_() for name, s in states.items()}
            _set_weights(soft_layers, weights)
            out = block_gm(x)
            # One node each way (the squared differences and their gradient), where sub, pow and sum take three.
            loss = F.mse_loss(out, y, reduction="sum") / (config.batch_size * output_positions(out, channel_dim))
            # A layer whose output does not reach the block's output differentiably gets a zero gradient.
            grads = torch.autograd.grad(loss, [*weights.values(), *scales], allow_unused=True,
                                        materialize_grads=True)
            scalars, numbers = table[t], host_table[t, :2].tolist()  # (reg_lambda, beta)
            if t % log_every == 0:  # the loss of this iteration's V, as the per-layer loop samples it
                curve[t // log_every] = _sampled_loss(loss, numbers, states, t)
            with torch.no_grad():
                for state, grad in zip(states.values(), grads):
                    state.step(grad, scalars, numbers, config.lr, adam, t)
                if step_optimizer is not None:
                    for scale, grad in zip(scales, grads[len(states):]):
                        scale.grad = grad
                    for group in step_optimizer.param_groups:  # cosine annealing to 0
                        group["lr"] = config.activation_step_lr * 0.5 * (1 + math.cos(math.pi * t / iterations))
                    step_optimizer.step()
                    for scale in scales:
                        scale.clamp_(min=1e-8)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    for name, state in states.items():
        if not torch.isfinite(state.v).all():
            raise ValueError(f"layer {name}: its rounding variables became NaN or Inf")
    for name, quantizer in quantizers.items():
        quantizer.eval()
        soft_layers[name].input_quantizer = quantizer  # the errors below are the quantized model's
        if not math.isfinite(quantizer.scale.item()):
            raise ValueError(f"layer {name}: its learned activation step became NaN or Inf")
    hard = {name: s.hard() for name, s in states.items()}
    _set_weights(soft_layers, {name: s.nearest for name, s in states.items()})
    nearest_error = block_error(block_gm, inputs, targets, device, channel_dim)
    _set_weights(soft_layers, {name: h[1] for name, h in hard.items()})
    adaround_error = block_error(block_gm, inputs, targets, device, channel_dim)
    undecided, codes, v = {}, {}, {}
    for name, s in states.items():
        v[name] = s.full_v()
        codes[name] = hard[name][0] if s.index is None else s.hard(v[name], s.full_weight)[0]
        h = rectified_sigmoid(v[name])
        undecided[name] = ((h > 0) & (h < 1)).float().mean().item()
    return BlockResult(codes=codes, v=v,
                       input_grids={name: q.grid() for name, q in quantizers.items()}, nearest_error=nearest_error,
                       adaround_error=adaround_error, undecided_fraction=undecided, loss_curve=curve,
                       seconds=time.perf_counter() - t0)


def _sampled_loss(loss, numbers, states, t) -> float:
    """The minibatch loss plus the regulariser's term (after the warm start); an error if not finite."""
    total = loss.detach()
    reg_lambda, beta = numbers
    if reg_lambda > 0:
        total = total + reg_lambda * sum(s.state.regularizer(beta) for s in states.values())
    value = total.item()
    if not math.isfinite(value):
        raise ValueError(f"the block's reconstruction loss is not finite at iteration {t}")
    return value


def _live_windows(block_gm, soft_layers, layers, inputs, device) -> dict:
    """layer: (index of its live taps, geometry over them) for each convolution of the block whose
    kernel reaches past its input (live_taps.py), found from the input shapes of one sample's pass."""
    shapes = {name: set() for name in soft_layers}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: shapes[name].add(tuple(args[0].shape)))
             for name, layer in soft_layers.items()]
    _set_weights(soft_layers, {layer.name: layer.weight.to(_compute_dtype(layer.weight.dtype)) for layer in layers})
    try:
        with torch.no_grad():
            block_gm(inputs[:1].to(device, copy=True))  # a copy: a block may change its input in place
    finally:
        for hook in hooks:
            hook.remove()
    windows = {}
    for layer in layers:
        kind = LAYER_KINDS[layer.kind]
        if kind.is_conv and not kind.transposed and len(shapes[layer.name]) == 1:  # one input shape
            window = live_window(layer.weight.shape, next(iter(shapes[layer.name])), layer.geometry)
            if window is not None:
                windows[layer.name] = window
    return windows


def _set_weights(soft_layers, weights):
    for name, weight in weights.items():
        soft_layers[name].weight = weight


def _calibrated_quantizers(block_gm, soft_layers, inputs, config, bits, seed, device) -> dict:
    """Each layer's input quantizer, its range calibrated (config.activation_range) on the block's
    float activations over the cached inputs, with the weights as the soft weights start (W~ = W
    clipped to the grid)."""
    for layer in soft_layers.values():
        layer.observer = RangeObserver()
    try:
        with torch.no_grad():
            for part in inputs.split(EVAL_CHUNK):
                block_gm(part.to(device, copy=True))  # a copy: a block may change its input in place
    finally:
        observers = {name: layer.observer for name, layer in soft_layers.items()}
        for layer in soft_layers.values():
            layer.observer = None
    generator = None
    if config.activation_drop > 0:
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the ops take its draws as seeds
    quantizers = {}
    for name, observer in observers.items():
        if not (math.isfinite(observer.lo) and math.isfinite(observer.hi)):
            raise ValueError(f"layer {name}: its input holds NaN or Inf")
        lo, hi = observer.range(config.activation_range, bits, config.activation_percentile)
        grid = activation_grid(lo, hi, bits)
        quantizers[name] = ReconstructionQuantizer(*grid, learn=config.learn_activation_steps,
                                                   drop=config.activation_drop, generator=generator, device=device)
        soft_layers[name].input_quantizer = quantizers[name]
    return quantizers


def _reading_block_values(block_gm: fx.GraphModule, soft_layers) -> set:
    """The layers whose input the block computes from another of its layers' output (rather than
    from the block's input alone)."""
    downstream, readers = set(), set()  # nodes that depend on a layer's output
    for node in block_gm.graph.nodes:
        if any(arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
            if node.op == "call_module" and node.target in soft_layers:
                readers.add(node.target)
        if node.op == "call_module" and node.target in soft_layers:
            downstream.add(node)
    return readers


def _clamp_bounds(node: fx.Node, block_gm: fx.GraphModule):
    """((lower, upper), in_place) of a ReLU, ReLU6 or Hardtanh (PyTorch's own classes and functions,
    without hooks) applied to its first argument alone; else None."""
    if node.op == "call_module":
        module = block_gm.get_submodule(node.target)
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        if type(module) is nn.ReLU:
            return (0.0, None), module.inplace
        if type(module) in (nn.Hardtanh, nn.ReLU6):
            return (float(module.min_val), float(module.max_val)), module.inplace
    if node.op == "call_function" and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}:
        in_place = bool(node.kwargs.get("inplace", False))
        if node.target in (F.relu, torch.relu):
            return (0.0, None), in_place
        if node.target is F.relu6:
            return (0.0, 6.0), in_place
    return None


def _read_only_here(node: fx.Node, block_gm: fx.GraphModule, soft_layers) -> bool:
    """Whether node's value is a layer's fresh output that nothing but its one reader sees, through
    Identity modules (folded BatchNorms), which hand their input on: what an in-place clamp may
    change without another node noticing."""
    while len(node.users) == 1 and node.op == "call_module":
        if node.target in soft_layers:
            return True
        if type(block_gm.get_submodule(node.target)) is not nn.Identity or not node.args:
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return False


def _fuse_clamps(block_gm: fx.GraphModule, soft_layers: Dict[str, SoftLayer]):
    """Moves a ReLU/ReLU6 whose output only a quantized layer of the block reads into that layer's
    input quantizer, which clamps before it quantizes: the same values and straight-through
    gradients in one pass each way instead of two. An in-place one only where the tensor it changes
    is read by nothing else (_read_only_here); only layers that run once per pass (the quantizer
    is the layer's, not the call's)."""
    calls = {}
    for node in block_gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = False
    for node in list(block_gm.graph.nodes):
        layer = soft_layers.get(node.target) if node.op == "call_module" else None
        if layer is None or layer.input_quantizer is None or calls[node.target] != 1 or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        found = _clamp_bounds(source, block_gm)
        inner = source.args[0] if source.args else None
        if found is None or not isinstance(inner, fx.Node):
            continue
        bounds, in_place = found
        if in_place and not _read_only_here(inner, block_gm, soft_layers):
            continue
        node.replace_input_with(source, inner)
        block_gm.graph.erase_node(source)
        layer.input_quantizer.clamp = bounds
        fused = True
    if fused:
        block_gm.recompile()


def block_error(block_gm, inputs, targets, device, channel_dim: int) -> float:
    """The block's reconstruction loss on the whole cache (the per-layer loss's normalisation)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in zip(inputs.split(EVAL_CHUNK), targets.split(EVAL_CHUNK)):
            out = block_gm(x.to(device, copy=True))  # a copy: a block may change its input in place
            total += (out - y.to(device)).pow(2).sum().item()
            count += len(x) * output_positions(out, channel_dim)
    return total / count


def _bar(description, total):
    if not description:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="it", leave=False)
