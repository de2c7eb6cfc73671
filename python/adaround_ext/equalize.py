"""Cross-layer equalization and high-bias absorption (docs/algorithm.md#cross-layer-equalization), after
Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.

For two layers joined by a positively homogeneous activation (ReLU, none, or pooling), scaling
output channel i of the first by 1/s_i and input channel i of the second by s_i leaves the model's
function unchanged. With s_i = sqrt(r1_i / r2_i) (r: the channel's weight range) both channels end up
with the range sqrt(r1_i * r2_i), so one per-tensor grid no longer zeroes the narrow channels.

ReLU6 is not positively homogeneous: relu6(x) = s * clamp(x / s, 0, 6 / s). It becomes a ChannelClip
with a per-channel upper bound that the scaling divides, so the function stays exact (AIMET instead
replaces ReLU6 by ReLU, which changes the model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folding import conv_bn_pairs, fold_batchnorm
from .layer_kinds import kind_of
from .modules import ChannelClip, set_submodule, trace

log = logging.getLogger("adaround_ext")

# Modules a channel scale passes through unchanged: each output channel depends on its input channel
# alone and positively homogeneously (f(x / s) = f(x) / s for s > 0). Pooling only after a conv: after
# a Linear it would pool over the features.
_PASS_THROUGH = (nn.Identity, nn.Dropout)
_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_RELU_FUNCTIONS = (F.relu, torch.relu)


@dataclass
class EqualizedPair:
    """Two layers whose channels are scaled against each other, and the activation between them."""
    first: str
    second: str
    activation: str  # "none", "relu" or "clip" (a ChannelClip, formerly ReLU6)
    clip: Optional[str] = None  # the ChannelClip's module name
    # A zero-padded average pooling between them averages zeros in at the border, where a bias
    # shift would not be constant: no absorption then.
    padded_average: bool = False


def _is_relu6(module) -> bool:
    return isinstance(module, nn.ReLU6) or (type(module) is nn.Hardtanh and (module.min_val, module.max_val) == (0.0, 6.0))


def _equalizable(module) -> bool:
    kind = kind_of(module)
    return kind is not None and not kind.transposed


def _shared_parameters(model: nn.Module, graph) -> set:
    """Names of the modules whose weight or bias is also reached otherwise (tied to another module, or
    read by the graph directly): scaling them in place would change that other use."""
    owners = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    read_directly = {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}
    return {name for names in owners.values() if len(names) > 1 for name in names} | read_directly


def _padded_average(module) -> bool:
    return isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)) and module.count_include_pad and any(
        p > 0 for p in (module.padding if isinstance(module.padding, tuple) else (module.padding,)))


def find_pairs(model: nn.Module) -> List[EqualizedPair]:
    """The consecutive (first, second) layer pairs of a BN-folded model: the first layer's output reaches
    only the second, through at most one ReLU/ReLU6 and any pass-through modules, and each layer is
    called once. A ReLU6 found here is replaced by a ChannelClip in place."""
    graph = trace(model)
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    shared = _shared_parameters(model, graph)
    scalable = lambda name: (_equalizable(modules.get(name)) and calls[name] == 1  # noqa: E731
                             and name not in shared)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not scalable(node.target):
            continue
        first_is_conv = kind_of(modules[node.target]).is_conv
        current, activation, clip, padded_average = node, "none", None, False
        while len(current.users) == 1:
            user = next(iter(current.users))
            target = modules.get(user.target) if user.op == "call_module" else None
            if user.op == "call_module" and _equalizable(target):
                if scalable(user.target) and _channels_match(modules[node.target], target):
                    pairs.append(EqualizedPair(node.target, user.target, activation, clip, padded_average))
                break
            relu = (isinstance(target, nn.ReLU) or (user.op == "call_function" and user.target in _RELU_FUNCTIONS)
                    or (user.op == "call_method" and user.target in ("relu", "relu_")))
            # A clip's bounds become per channel: only one the pair alone calls.
            clip_like = (isinstance(target, ChannelClip) or _is_relu6(target)) and calls[user.target] == 1
            if (relu or clip_like) and activation == "none":
                activation = "relu" if relu else "clip"
                clip = user.target if clip_like else None
            elif isinstance(target, _POOLING) and first_is_conv:
                padded_average = padded_average or _padded_average(target)
            elif not isinstance(target, _PASS_THROUGH):
                break
            current = user
    for pair in pairs:  # every ReLU6 on a pair: its channels will be scaled
        if pair.clip is not None and not isinstance(modules[pair.clip], ChannelClip):
            first = modules[pair.first]
            channel_dim = 1 if kind_of(first).is_conv else -1
            upper = torch.full((_out_channels(first),), 6.0, device=first.weight.device)
            set_submodule(model, pair.clip, ChannelClip(upper, channel_dim))
    return pairs


def _out_channels(module) -> int:
    return module.weight.shape[0]


def _channels_match(first, second) -> bool:
    """Conv to conv or Linear to Linear (their channels lie on different axes), channel counts equal."""
    in_channels = second.weight.shape[1] * getattr(second, "groups", 1)
    return kind_of(first).is_conv == kind_of(second).is_conv and _out_channels(first) == in_channels


def _output_ranges(first) -> torch.Tensor:
    return first.weight.detach().abs().flatten(1).amax(dim=1)


def _input_view(second) -> tuple:
    """(groups, outputs per group, inputs per group) of the second layer's weight."""
    groups = getattr(second, "groups", 1)
    out_channels, in_per_group = second.weight.shape[:2]
    return groups, out_channels // groups, in_per_group


def _per_input(weight: torch.Tensor) -> torch.Tensor:
    """A Linear or conv weight as [out, in / groups, kernel elements] (1 for a Linear)."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def _input_ranges(second) -> torch.Tensor:
    """The largest |weight| touching each input channel of the (possibly grouped) second layer."""
    groups, out_per_group, in_per_group = _input_view(second)
    w = _per_input(second.weight.detach().abs()).amax(dim=2)  # [out, in / groups]
    return w.reshape(groups, out_per_group, in_per_group).amax(dim=1).reshape(-1)


def _scale_inputs_(second, scale: torch.Tensor) -> None:
    """Multiplies the weights that read input channel j by scale[j]."""
    groups, out_per_group, in_per_group = _input_view(second)
    factor = scale.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
    factor = factor.reshape(second.weight.shape[:2] + (1,) * (second.weight.dim() - 2))
    second.weight.data.mul_(factor.to(second.weight.dtype))


def _scale_outputs_(first, scale: torch.Tensor) -> None:
    """Divides output channel i of the first layer (weight and bias) by scale[i]."""
    shape = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.data.div_(scale.reshape(shape).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.data.div_(scale.to(first.bias.dtype))


def equalize_pair_(model: nn.Module, pair: EqualizedPair) -> torch.Tensor:
    """One equalization step of a pair in place; returns the channel scales s applied."""
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    r1, r2 = _output_ranges(first).double(), _input_ranges(second).double()
    scale = torch.where((r1 > 0) & (r2 > 0), (r1 / r2).sqrt(), torch.ones_like(r1))
    _scale_outputs_(first, scale)
    _scale_inputs_(second, scale)
    if pair.clip is not None:
        model.get_submodule(pair.clip).upper.div_(scale.to(torch.float32))
    return scale


def _bn_statistics(model: nn.Module) -> Dict[str, tuple]:
    """For each conv followed by a BatchNorm: the mean and standard deviation of its (BN-normalised)
    output, BN's beta and |gamma| (DFQ §4.2 models the pre-activation as N(beta, gamma^2))."""
    stats = {}
    for conv_name, bn_name in conv_bn_pairs(model):
        bn = model.get_submodule(bn_name)
        if bn.affine:
            stats[conv_name] = (bn.bias.detach().double().clone(), bn.weight.detach().double().abs().clone())
    return stats


def _absorb_high_bias_(model: nn.Module, pair: EqualizedPair, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """DFQ §4.1: moves c = max(0, mean - 3 std) of the first layer's bias past the activation into the
    second layer's bias, which is exact wherever the pre-activation is >= c (with a Gaussian
    pre-activation: all but 0.13 % of values). Only for a second layer without padding: a padded
    border would read 0 where the shifted input is -c. Returns c."""
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    padding = getattr(second, "padding", (0,))
    if first.bias is None or pair.padded_average or (isinstance(padding, str) and padding != "valid") or (
            not isinstance(padding, str) and any(padding)):
        return torch.zeros_like(mean)
    c = (mean - 3 * std).clamp(min=0)
    if pair.clip is not None:  # never past the clip's upper bound: clamp(x, 0, u) with x >= u is u
        c = torch.minimum(c, model.get_submodule(pair.clip).upper.double())
        model.get_submodule(pair.clip).upper.sub_(c.float())
    first.bias.data.sub_(c.to(first.bias.dtype))
    groups, out_per_group, in_per_group = _input_view(second)
    weight = _per_input(second.weight.detach().double()).sum(dim=2)  # [out, in / groups]
    shift = (weight.reshape(groups, out_per_group, in_per_group) * c.reshape(groups, 1, in_per_group)).sum(dim=2)
    if second.bias is None:
        second.bias = nn.Parameter(torch.zeros(second.weight.shape[0], dtype=second.weight.dtype,
                                               device=second.weight.device))
    second.bias.data.add_(shift.reshape(-1).to(second.bias.dtype))
    return c


def equalize(model: nn.Module, iterations: int = 100, tolerance: float = 1e-6,
             bias_absorption: bool = True) -> nn.Module:
    """Cross-layer equalization of `model` in place (returns it): BatchNorm folding, then every
    consecutive layer pair (find_pairs) equalized, repeated until no channel scale differs from 1 by
    more than `tolerance` (chains of three or more layers need several rounds), then, with
    `bias_absorption`, high-bias absorption from the BatchNorm statistics. In FP32 the model computes
    the same function, except what bias absorption shifts (see _absorb_high_bias_)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    model.eval()
    try:
        trace(model)
    except Exception as exc:  # the same limit as BN folding: CLE needs the graph
        raise ValueError(f"cross-layer equalization needs a model torch.fx can trace: {exc}") from exc
    stats = _bn_statistics(model) if bias_absorption else {}  # read before folding removes them
    fold_batchnorm(model)
    pairs = find_pairs(model)
    for pair in pairs:
        if not torch.isfinite(model.get_submodule(pair.first).weight).all() or not torch.isfinite(
                model.get_submodule(pair.second).weight).all():
            raise ValueError(f"cross-layer equalization: layer {pair.first} or {pair.second} holds NaN or Inf")
    total = {}  # each first layer's product of channel scales, for the bias absorption's units
    for pair in pairs:
        weight = model.get_submodule(pair.first).weight
        total[pair.first] = torch.ones(weight.shape[0], dtype=torch.float64, device=weight.device)
    for _ in range(iterations):
        largest = 0.0
        for pair in pairs:
            scale = equalize_pair_(model, pair)
            total[pair.first] *= scale
            largest = max(largest, (scale - 1).abs().max().item())
        if largest <= tolerance:
            break
    for pair in pairs:
        if pair.first in stats and pair.activation != "none":
            mean, std = stats[pair.first]
            scale = total[pair.first]
            _absorb_high_bias_(model, pair, mean / scale, std / scale)
    model.adaround_channel_clips = sorted({p.clip for p in pairs if p.clip is not None})
    log.info("cross-layer equalization: %d layer pairs", len(pairs))
    return model
