"""Export in the layout of AIMET's encodings JSON (version 0.6.1), so that models rounded here can go
on to the toolchains that read AIMET encodings.

Mapping from our grid (real = scale * (code - zero_point), code in [quant_min, quant_max]) to AIMET's
(real = scale * (q + offset), q in [0, 2^bitwidth - 1]):
    bitwidth = log2(quant_max - quant_min + 1)
    offset   = quant_min - zero_point
    min      = scale * offset,  max = scale * (offset + 2^bitwidth - 1)
    is_symmetric: "True" for a signed grid with zero_point 0, else "False"
Weights get one entry per output channel (per-channel) or one entry (per-tensor), keyed
"<layer>.weight"; activations one entry keyed "<layer>.input" (the input of each quantized layer).
"""
from __future__ import annotations

import json

import torch.nn as nn

from .modules import QuantizedLayer

VERSION = "0.6.1"


def _entry(scale: float, zero_point: float, quant_min: int, quant_max: int) -> dict:
    bitwidth = (quant_max - quant_min + 1).bit_length() - 1
    offset = int(round(quant_min - zero_point))
    return {"bitwidth": bitwidth, "dtype": "int",
            "is_symmetric": str(quant_min < 0 and zero_point == 0),
            "min": scale * offset, "max": scale * (offset + 2**bitwidth - 1),
            "offset": offset, "scale": scale}


def encodings(model: nn.Module) -> dict:
    params, activations = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLayer):
            continue
        scales = m.scale.reshape(-1).tolist()
        zps = m.zero_point.reshape(-1).tolist()
        params[f"{name}.weight"] = [_entry(s, z, m.quant_min, m.quant_max) for s, z in zip(scales, zps)]
        q = m.input_quantizer
        if q is not None:
            activations[f"{name}.input"] = [_entry(q.scale.item(), float(q.zero_point.item()), q.quant_min,
                                                   q.quant_max)]
    if not params:
        raise ValueError("the model has no QuantizedLayer; quantize it first")
    return {"version": VERSION, "activation_encodings": activations, "param_encodings": params,
            "excluded_layers": [], "quantizer_args": {"per_channel_quantization": any(
                len(v) > 1 for v in params.values())}}


def export_encodings(model: nn.Module, path: str) -> None:
    with open(path, "w") as f:
        json.dump(encodings(model), f, indent=1)
