"""Export for AIMET (aimet-torch 2.x, docs/design.md#exports): the encodings file its
QuantizationSimModel.load_encodings reads, a quantsim configuration that gives the simulated model
(at least) the quantizers the file names, and the model's BN-folded, rounded weights as a state dict,
which is what AIMET's own AdaRound hands its users.

    prepared = prepare_model(fresh_model); fold_all_batch_norms(prepared, input_shape)
    prepared.load_state_dict(torch.load("<stem>.aimet_weights.pth"))
    sim = QuantizationSimModel(prepared, dummy_input, config_file="<stem>.aimet_config.json")
    sim.load_encodings("<stem>.encodings.json", strict=True, partial=False)

`partial=False` drops the simulated model's quantizers that the file does not name, so the
simulation quantizes exactly where this project does (either activation placement).

Mapping from our grid (real = scale * (code - zero_point), code in [quant_min, quant_max]) to AIMET's
(real = scale * (q + offset), q in [0, 2^bitwidth - 1]):
    bitwidth = log2(quant_max - quant_min + 1)
    offset   = quant_min - zero_point
    min      = scale * offset,  max = scale * (offset + 2^bitwidth - 1)
    is_symmetric: "True" for a signed grid with zero_point 0, else "False"
Weights get one entry per output channel (per-channel) or one entry (per-tensor), keyed
"<layer>.weight". Activations are keyed by module, then "input" or "output", then the index:
{"conv1": {"input": {"0": entry}}}, with AIMET's module names (placement.py).
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from .modules import ActivationQuantizer, ChannelClip, QuantizedLayer, check_output_path
from .placement import aimet_key_of, output_quantizer_slots

VERSION = "1.0.0"


def _entry(scale: float, zero_point: float, quant_min: int, quant_max: int) -> dict:
    bitwidth = (quant_max - quant_min + 1).bit_length() - 1
    offset = int(round(quant_min - zero_point))
    return {"bitwidth": bitwidth, "dtype": "int",
            "is_symmetric": str(quant_min < 0 and zero_point == 0),
            "min": scale * offset, "max": scale * (offset + 2**bitwidth - 1),
            "offset": offset, "scale": scale}


def _activation_entry(q: ActivationQuantizer) -> dict:
    return _entry(q.scale.item(), float(q.zero_point.item()), q.quant_min, q.quant_max)


def _quantized_layers(model: nn.Module) -> dict:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise ValueError("the model has no QuantizedLayer; quantize it first")
    return layers


def encodings(model: nn.Module) -> dict:
    """The encodings of a quantized model in AIMET 2.x's layout, as a dict."""
    params, activations = {}, {}
    for name, m in _quantized_layers(model).items():
        scales = m.scale.reshape(-1).tolist()
        zps = m.zero_point.reshape(-1).tolist()
        params[f"{name}.weight"] = [_entry(s, z, m.quant_min, m.quant_max) for s, z in zip(scales, zps)]
        if m.input_quantizer is not None:
            activations.setdefault(name, {})["input"] = {"0": _activation_entry(m.input_quantizer)}
    for key, slot in output_quantizer_slots(model).items():
        if isinstance(slot, ActivationQuantizer):
            module, kind, index = aimet_key_of(model, key)
            activations.setdefault(module, {}).setdefault(kind, {})[str(index)] = _activation_entry(slot)
    return {"version": VERSION, "producer": {"package": "adaround_ext"}, "activation_encodings": activations,
            "param_encodings": params, "excluded_layers": [],
            "quantizer_args": {"per_channel_quantization": any(len(v) > 1 for v in params.values())}}


def aimet_config(model: nn.Module) -> dict:
    """A quantsim configuration under which every op has an output quantizer, the model input one, and
    every weight one of our kind (per-channel or not, symmetric or not); load_encodings(partial=False)
    then keeps exactly the ones the encodings name. AIMET's configuration cannot put a quantizer on one
    consumer's view of a shared tensor: for activation_placement="inputs" the input quantizers are
    added to the simulated modules by AIMET's API (benchmarks/peers/aimet_load.py)."""
    layers = list(_quantized_layers(model).values())
    per_channel = any(m.axis is not None for m in layers)
    symmetric = all(m.quant_min < 0 and not m.zero_point.any() for m in layers)
    true = lambda flag: "True" if flag else "False"  # noqa: E731  (AIMET's schema wants strings)
    layer_ops = {op: {"per_channel_quantization": true(per_channel)}
                 for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")}  # AIMET's (ONNX) names of our kinds
    return {"defaults": {"ops": {"is_output_quantized": "True"},
                         "params": {"is_quantized": "True", "is_symmetric": true(symmetric)},
                         "strict_symmetric": "False", "unsigned_symmetric": "False",
                         "per_channel_quantization": true(per_channel)},
            "params": {"bias": {"is_quantized": "False"}}, "op_type": layer_ops, "supergroups": [],
            "model_input": {"is_input_quantized": "True"}, "model_output": {}}


def rounded_state_dict(model: nn.Module) -> dict:
    """The float model's state dict after BN folding with each quantized weight at its rounded value
    (scale * (code - zero_point)): loads into the BN-folded float model (AIMET's prepared one too)."""
    layers = _quantized_layers(model)
    quantizers = [name for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)]
    skipped = tuple(f"{name}." for name in [*layers, *quantizers])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skipped)}
    for name, m in layers.items():
        state[f"{name}.weight"] = m.dequantized_weight().detach().cpu()
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().cpu()
    return state


def export_encodings(model: nn.Module, path: str) -> None:
    check_output_path(path)
    with open(path, "w") as f:
        json.dump(encodings(model), f, indent=1)


def export_aimet(model: nn.Module, stem: str) -> list:
    """Writes <stem>.encodings.json, <stem>.aimet_config.json and <stem>.aimet_weights.pth; returns
    their paths."""
    clips = [name for name, m in model.named_modules() if isinstance(m, ChannelClip)]
    if clips:
        raise ValueError(f"the model has ChannelClips (cross-layer equalization across ReLU6: {', '.join(clips)}), "
                         f"which AIMET's unmodified model does not have: its ReLU6 would clip at other bounds")
    paths = [stem + ".encodings.json", stem + ".aimet_config.json", stem + ".aimet_weights.pth"]
    for path in paths:
        check_output_path(path)
    export_encodings(model, paths[0])
    with open(paths[1], "w") as f:
        json.dump(aimet_config(model), f, indent=1)
    torch.save(rounded_state_dict(model), paths[2])
    return paths

