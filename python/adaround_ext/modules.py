"""Modules of the quantized model: integer weight codes with their grid, and 8-bit activations."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .layer_kinds import LAYER_KINDS, kind_of


class ActivationQuantizer(nn.Module):
    """Per-tensor affine fake quantization of an activation (calibrated min/max range)."""

    def __init__(self, scale: float, zero_point: int, quant_min: int, quant_max: int):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int32))
        self.quant_min = int(quant_min)
        self.quant_max = int(quant_max)

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale.to(x.device), self.zero_point.to(x.device),
                                                     self.quant_min, self.quant_max)

    def extra_repr(self):
        return f"scale={self.scale.item():.4g}, zero_point={self.zero_point.item()}, range=[{self.quant_min}, {self.quant_max}]"


class ChannelClip(nn.Module):
    """clamp(x, 0, upper[c]) with one upper bound per channel: a ReLU6 after cross-layer equalization
    scaled its channels (equalize.py). channel_dim: 1 after a conv, -1 after a Linear."""

    def __init__(self, upper: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        self.register_buffer("upper", upper.detach().float().clone())
        self.channel_dim = int(channel_dim)

    def forward(self, x):  # channels moved last to broadcast: torch.fx traces this without x's rank
        clipped = torch.minimum(x.clamp(min=0).movedim(self.channel_dim, -1), self.upper.to(x.dtype))
        return clipped.movedim(-1, self.channel_dim)

    def extra_repr(self):
        return f"channels={self.upper.numel()}, channel_dim={self.channel_dim}"


class QuantizedLayer(nn.Module):
    """A Linear, Conv1d/2d or ConvTranspose1d/2d whose weight is stored as integer codes.

    weight = scale * (codes - zero_point), broadcast along `axis` (None: one scale for the tensor).
    An optional input quantizer simulates the quantized activation that feeds the layer.
    """

    def __init__(self, kind: str, codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                 quant_min: int, quant_max: int, axis: Optional[int], bias: Optional[torch.Tensor],
                 stride=(1,), padding=(0,), dilation=(1,), groups: int = 1, output_padding=(0,)):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.register_buffer("codes", codes.detach().clone())
        self.register_buffer("scale", scale.detach().float().clone())
        zp = torch.zeros_like(self.scale) if zero_point is None else zero_point.detach().float().clone()
        self.register_buffer("zero_point", zp)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups, self.output_padding = int(groups), tuple(output_padding)
        self.input_quantizer: Optional[ActivationQuantizer] = None

    @property
    def bits(self) -> int:
        return (self.quant_max - self.quant_min + 1).bit_length() - 1

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return t.reshape(())
        shape = [1] * self.codes.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def dequantized_weight(self) -> torch.Tensor:
        return self._broadcast(self.scale) * (self.codes.float() - self._broadcast(self.zero_point))

    def forward(self, x):
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return apply_layer(self, x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self):
        grid = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.kind}, weight={tuple(self.codes.shape)}, {self.bits}-bit {grid}"


def apply_layer(layer, x, w, bias):
    """The Linear/Conv computation of `layer` (kind and geometry attributes) with weight `w`; shared by
    QuantizedLayer and the ONNX export view."""
    return LAYER_KINDS[layer.kind].apply(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups,
                                         layer.output_padding)


class LeafTracer(fx.Tracer):
    """torch.fx's tracer with this package's modules as leaves: a graph shows a QuantizedLayer,
    ChannelClip or ActivationQuantizer as one call, as it shows torch.nn's own modules."""

    def is_leaf_module(self, m, qualified_name):
        return isinstance(m, (QuantizedLayer, ChannelClip, ActivationQuantizer)) or super().is_leaf_module(
            m, qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of `model` (LeafTracer); raises what tracing raises on an untraceable model."""
    return LeafTracer().trace(model)


def check_output_path(path: str) -> None:
    """A clear error before any work when the file cannot be written for want of its directory."""
    import os

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"path {path!r}: directory {directory!r} does not exist")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule at dotted path `name` (e.g. "layer1.0.conv1")."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


KINDS = tuple(LAYER_KINDS)


def layer_kind(module: nn.Module) -> Optional[str]:
    kind = kind_of(module)
    return None if kind is None else kind.name


def is_transposed(kind: str) -> bool:
    return LAYER_KINDS[kind].transposed


def channel_axis(kind: str) -> int:
    """The weight axis of the output channels: ConvTranspose weights are [in, out / groups, ...]."""
    return LAYER_KINDS[kind].channel_axis


def float_weight_layers(model: nn.Module, quantized) -> list:
    """The modules that own a weight matrix (a "*weight*" parameter of two or more dimensions) that quantize()
    leaves in floating point, as "name (Type)": types it cannot learn the rounding of (Conv3d, Embedding,
    GRU, MultiheadAttention's input projection), and Linear/Conv modules whose forward is never called
    (MultiheadAttention reads its out_proj's weight directly). `quantized`: the names that are quantized."""
    kept = []
    for name, module in model.named_modules():
        owns_weights = any(p.dim() >= 2 and "weight" in key for key, p in module.named_parameters(recurse=False))
        if name in quantized or not owns_weights:  # class tokens and position embeddings are not weights
            continue
        reason = ", not called by forward" if layer_kind(module) is not None else ""
        kept.append(f"{name or '<model>'} ({type(module).__name__}{reason})")
    return kept


def explicit_padding(module: nn.Module) -> tuple:
    """The padding of a convolution as numbers; "valid" is 0 and "same" the symmetric padding that keeps
    the size (stride 1, dilation * (kernel - 1) even in every dimension)."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {tuple(module.kernel_size)} and dilation "
                         f"{tuple(module.dilation)} pads unevenly; only symmetric padding is supported")
    return tuple(t // 2 for t in total)


def geometry(module: nn.Module) -> dict:
    kind = kind_of(module)
    if not kind.is_conv:
        return dict(stride=(1,), padding=(0,), dilation=(1,), groups=1)
    if module.padding_mode != "zeros":
        raise ValueError(f"padding_mode={module.padding_mode!r} is not supported; only zeros")
    geo = dict(stride=tuple(module.stride), padding=explicit_padding(module), dilation=tuple(module.dilation),
               groups=module.groups)
    if kind.transposed:
        geo["output_padding"] = tuple(module.output_padding)
    return geo
