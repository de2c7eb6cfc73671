"""Save a quantized model (integer codes + grids) and load it back into a fresh model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .modules import ActivationQuantizer, QuantizedLayer, check_output_path, layer_kind, set_submodule

FORMAT = "adaround_ext/1"
_KEYS = ("layers", "folded_batchnorm", "state")


def _layer_state(m: QuantizedLayer) -> dict:
    state = dict(kind=m.kind, codes=m.codes.cpu(), scale=m.scale.cpu(), zero_point=m.zero_point.cpu(),
                 quant_min=m.quant_min, quant_max=m.quant_max, axis=m.axis,
                 bias=None if m.bias is None else m.bias.cpu(), stride=m.stride, padding=m.padding,
                 dilation=m.dilation, groups=m.groups, output_padding=m.output_padding, input_quantizer=None)
    if m.input_quantizer is not None:
        q = m.input_quantizer
        state["input_quantizer"] = (q.scale.item(), int(q.zero_point.item()), q.quant_min, q.quant_max)
    return state


def save_quantized(model: nn.Module, path: str) -> None:
    """Writes the quantized layers (int codes, scales, zero points), the folded BatchNorm names,
    the remaining parameters and the report."""
    layers = {name: _layer_state(m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise ValueError("the model has no QuantizedLayer; quantize it first")
    check_output_path(path)
    # Conv/Linear modules that stayed float (e.g. MultiheadAttention's out_proj): a load expects them so.
    float_layers = [name for name, m in model.named_modules() if layer_kind(m) is not None]
    quantized_prefixes = tuple(name + "." for name in layers)
    rest = {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith(quantized_prefixes)}
    report = getattr(model, "adaround_report", None)
    torch.save({"format": FORMAT, "layers": layers, "folded_batchnorm": getattr(model, "adaround_folded_batchnorm", []),
                "float_layers": float_layers, "state": rest, "report": None if report is None else report.to_dict()},
               path)


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Returns a copy of `model` (e.g. a fresh torchvision resnet18) with the saved quantization."""
    try:
        saved = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # a damaged file fails in the zip reader, in pickle, or anywhere between
        raise ValueError(f"cannot read a quantized model from {path!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or any(k not in saved for k in _KEYS):
        raise ValueError(f"{path!r} is not an adaround_ext quantized model ({FORMAT})")
    model = copy.deepcopy(model).eval()
    for name in saved["folded_batchnorm"]:
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path!r} folded a BatchNorm {name!r} that the model does not have") from exc
        set_submodule(model, name, nn.Identity())
    model.adaround_folded_batchnorm = list(saved["folded_batchnorm"])  # a later save_quantized keeps them
    for name, state in saved["layers"].items():
        try:
            original = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path!r} quantized a layer {name!r} that the model does not have: it was saved "
                             f"from another model") from exc
        if layer_kind(original) != state["kind"] or tuple(original.weight.shape) != tuple(state["codes"].shape):
            raise ValueError(f"{path!r}: layer {name!r} does not match: the model has {original}, the file a "
                             f"{state['kind']} of weight shape {tuple(state['codes'].shape)}")
        state = dict(state)
        act = state.pop("input_quantizer")
        layer = QuantizedLayer(**state)
        if act is not None:
            layer.input_quantizer = ActivationQuantizer(*act)
        set_submodule(model, name, layer)
    # Every Conv/Linear of the model must be one the file quantized, and every other parameter must
    # come from the file: a model of another architecture would otherwise keep random float weights.
    kept_float = set(saved.get("float_layers", ()))
    float_layers = [name for name, m in model.named_modules()
                    if layer_kind(m) is not None and not isinstance(m, QuantizedLayer) and name not in kept_float]
    if float_layers:
        raise ValueError(f"{path!r} has no quantized weights for the model's layers {float_layers}: it was saved "
                         f"from another model")
    quantized_prefixes = tuple(name + "." for name in saved["layers"])
    result = model.load_state_dict(saved["state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(quantized_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path!r} does not fit the model: parameters missing from the file {missing}, "
                         f"in the file but not in the model {result.unexpected_keys}")
    return model
