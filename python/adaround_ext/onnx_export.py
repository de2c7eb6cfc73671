"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) pairs, readable by onnxruntime and the
deployment toolchains that consume QDQ models.

Weights are stored as their integer codes feeding a DequantizeLinear (per-channel: axis 0, one scale
and zero point per output channel); codes of 4 bits or fewer go into INT4/UINT4 tensors at opset >= 21
and into INT8/UINT8 containers below that. Each activation quantizer becomes a QuantizeLinear ->
DequantizeLinear pair where it sits, on the layer input or on an op output (8-bit: UINT8 for
[0, 255], INT8 for [-128, 127]).

The graph comes from torch's own exporter (torch.export + onnxscript), which translates torch's
`quantized_decomposed` ops to QDQ; the INT4 packing is a small rewrite of the resulting initializers.
"""
from __future__ import annotations

import copy
from typing import Dict

import numpy as np
import torch
import torch.nn as nn

from .modules import ActivationQuantizer, QuantizedLayer, apply_layer, check_output_path, set_submodule
from .placement import SLOTS, output_quantizer_slots

# Importing the module registers torch.ops.quantized_decomposed.*.
import torch.ao.quantization.fx._decomposed  # noqa: F401,E402

_qd = torch.ops.quantized_decomposed
DEFAULT_OPSET = 21  # the first opset with INT4/UINT4 in DequantizeLinear
_ACTIVATION_DTYPES = {(0, 255): torch.uint8, (-128, 127): torch.int8}


def _container_dtype(quant_min: int) -> torch.dtype:
    return torch.int8 if quant_min < 0 else torch.uint8


class _QDQActivation(nn.Module):
    """Export view of an ActivationQuantizer: QuantizeLinear -> DequantizeLinear (8-bit only)."""

    def __init__(self, name: str, quantizer: ActivationQuantizer):
        super().__init__()
        dtype = _ACTIVATION_DTYPES.get((quantizer.quant_min, quantizer.quant_max))
        if dtype is None:
            raise ValueError(f"{name}: ONNX export supports 8-bit activation quantizers ([0, 255] or [-128, 127]); "
                             f"its range is [{quantizer.quant_min}, {quantizer.quant_max}]")
        self.grid = (quantizer.scale.item(), int(quantizer.zero_point.item()), quantizer.quant_min,
                     quantizer.quant_max, dtype)

    def forward(self, x):
        return _qd.dequantize_per_tensor(_qd.quantize_per_tensor(x, *self.grid), *self.grid)


class _QDQLayer(nn.Module):
    """Export view of a QuantizedLayer: the same arithmetic, spelled in quantized_decomposed ops."""

    def __init__(self, name: str, layer: QuantizedLayer):
        super().__init__()
        zero_point = layer.zero_point.round()
        if not torch.equal(zero_point, layer.zero_point):
            raise ValueError(f"layer {name!r}: ONNX needs integer weight zero points, got {layer.zero_point}")
        self.kind, self.axis = layer.kind, layer.axis
        self.quant_min, self.quant_max = layer.quant_min, layer.quant_max
        self.dtype = _container_dtype(layer.quant_min)
        self.register_buffer("codes", layer.codes.to(self.dtype))
        self.register_buffer("scale", layer.scale.reshape(-1).float())
        self.register_buffer("zero_point", zero_point.reshape(-1).long())
        # Per-tensor grids enter the graph as constants (torch.export cannot read tensors with .item()).
        self.tensor_grid = (layer.scale.reshape(-1)[0].item(), int(zero_point.reshape(-1)[0].item()))
        self.register_buffer("bias", layer.bias)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.output_padding = layer.output_padding
        q = layer.input_quantizer
        self.input_qdq = None if q is None else _QDQActivation(f"layer {name!r}: input", q)

    def forward(self, x):
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        if self.axis is None:
            w = _qd.dequantize_per_tensor(self.codes, *self.tensor_grid, self.quant_min, self.quant_max, self.dtype)
        else:
            w = _qd.dequantize_per_channel(self.codes, self.scale, self.zero_point, self.axis, self.quant_min,
                                           self.quant_max, self.dtype)
        return apply_layer(self, x, w, self.bias)


def _export_view(model: nn.Module) -> tuple[nn.Module, Dict[str, QuantizedLayer]]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise ValueError("the model has no QuantizedLayer; quantize it first")
    view = copy.deepcopy(model).cpu().eval()
    for name, layer in layers.items():
        set_submodule(view, name, _QDQLayer(name, layer))
    for key, quantizer in output_quantizer_slots(model).items():  # activation_placement="outputs"
        if isinstance(quantizer, ActivationQuantizer):
            set_submodule(view, f"{SLOTS}.{key}", _QDQActivation(f"activation {key!r}", quantizer))
    return view, layers


def _pack_low_bit_weights(proto, layers: Dict[str, QuantizedLayer]) -> None:
    """Moves the codes of <= 4-bit layers from 8-bit containers into INT4/UINT4 tensors."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".codes"):
            continue
        layer = layers.get(node.input[0][: -len(".codes")])
        if layer is None or layer.bits > 4:
            continue
        signed = layer.quant_min < 0
        elem = TensorProto.INT4 if signed else TensorProto.UINT4
        codes = numpy_helper.to_array(initializers[node.input[0]]).astype(np.int32)
        zero_point = layer.zero_point.reshape(-1).round().to(torch.int32).numpy()
        if layer.axis is None:
            zero_point = zero_point.reshape(())
        packed = helper.make_tensor(node.input[0], elem, codes.shape, codes.flatten().tolist())
        initializers[node.input[0]].CopyFrom(packed)
        # A fresh zero-point tensor per layer: the exporter may share one initializer between layers.
        zp_name = node.input[0][: -len(".codes")] + ".weight_zero_point"
        proto.graph.initializer.append(helper.make_tensor(zp_name, elem, zero_point.shape,
                                                          zero_point.flatten().tolist()))
        node.input[2] = zp_name
    # Zero points no node reads any more (the exporter's shared ones) are dropped.
    used = {name for node in proto.graph.node for name in node.input}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _input_name(model: nn.Module) -> str:
    """The name of forward's input, which keys its dynamic shape (a GraphModule, activation_placement=
    "outputs", takes its input by the traced name)."""
    import inspect

    return next(iter(inspect.signature(model.forward).parameters))


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str, opset: int = DEFAULT_OPSET) -> None:
    """Writes `model` (the output of adaround_ext.quantize) as a QDQ ONNX model at `path`.

    example_input: one batch of the model's input (the batch dimension is exported as dynamic).
    opset >= 21 stores 2-4-bit weight codes as INT4/UINT4, lower opsets (>= 13) as INT8/UINT8.
    """
    import onnx

    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-channel DequantizeLinear), got {opset}")
    check_output_path(path)
    view, layers = _export_view(model)
    example_input = example_input.detach().cpu().float()
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(view, (example_input,), dynamo=True, opset_version=opset, verbose=False,
                                input_names=["input"], output_names=["output"],
                                dynamic_shapes={_input_name(view): {0: batch}})
    proto = program.model_proto
    if opset >= 21:
        _pack_low_bit_weights(proto, layers)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def onnx_weight_codes(path: str) -> Dict[str, np.ndarray]:
    """The integer weight codes stored in an exported model, by layer name (INT4 unpacked)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    return {t.name[: -len(".codes")]: numpy_helper.to_array(t).astype(np.int32)
            for t in proto.graph.initializer if t.name.endswith(".codes")}
