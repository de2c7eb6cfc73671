"""Save a quantized model (integer codes + grids) and load it back into a fresh model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .modules import ActivationQuantizer, ChannelClip, QuantizedLayer, check_output_path, layer_kind, set_submodule
from .placement import SLOTS, output_quantizer_slots, place_output_quantizers, set_output_quantizers

FORMAT = "adaround_ext/1"
# Files with ChannelClips or op-output quantizers: a reader of FORMAT alone would drop them silently.
FORMAT_WITH_GRAPH_CHANGES = "adaround_ext/2"
_KEYS = ("layers", "folded_batchnorm", "state")


def _layer_state(m: QuantizedLayer) -> dict:
    state = dict(kind=m.kind, codes=m.codes.cpu(), scale=m.scale.cpu(), zero_point=m.zero_point.cpu(),
                 quant_min=m.quant_min, quant_max=m.quant_max, axis=m.axis,
                 bias=None if m.bias is None else m.bias.cpu(), stride=m.stride, padding=m.padding,
                 dilation=m.dilation, groups=m.groups, output_padding=m.output_padding, input_quantizer=None)
    if m.input_quantizer is not None:
        state["input_quantizer"] = _quantizer_state(m.input_quantizer)
    return state


def _quantizer_state(q: ActivationQuantizer) -> tuple:
    return q.scale.item(), int(q.zero_point.item()), q.quant_min, q.quant_max


def save_quantized(model: nn.Module, path: str) -> None:
    """Writes the quantized layers (int codes, scales, zero points), the folded BatchNorm names,
    the remaining parameters and the report."""
    layers = {name: _layer_state(m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise ValueError("the model has no QuantizedLayer; quantize it first")
    check_output_path(path)
    # Conv/Linear modules that stayed float (e.g. MultiheadAttention's out_proj): a load expects them so.
    float_layers = [name for name, m in model.named_modules() if layer_kind(m) is not None]
    # activation_placement="outputs": the quantizers on op outputs, by slot (placement.py).
    outputs = {key: _quantizer_state(q) for key, q in output_quantizer_slots(model).items()
               if isinstance(q, ActivationQuantizer)}
    skipped = tuple(name + "." for name in layers) + ((SLOTS + ".",) if outputs else ())
    rest = {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith(skipped)}
    report = getattr(model, "adaround_report", None)
    # ReLU6 modules that cross-layer equalization turned into ChannelClips: name -> channel_dim.
    clips = {name: m.channel_dim for name, m in model.named_modules() if isinstance(m, ChannelClip)}
    torch.save({"format": FORMAT_WITH_GRAPH_CHANGES if clips or outputs else FORMAT, "layers": layers, "folded_batchnorm": getattr(model, "adaround_folded_batchnorm", []),
                "channel_clips": clips, "output_quantizers": outputs, "float_layers": float_layers, "state": rest,
                "report": None if report is None else report.to_dict()}, path)


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Returns a copy of `model` (e.g. a fresh torchvision resnet18) with the saved quantization."""
    try:
        saved = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # a damaged file fails in the zip reader, in pickle, or anywhere between
        raise ValueError(f"cannot read a quantized model from {path!r}: {type(exc).__name__}: {exc}") from exc
    formats = (FORMAT, FORMAT_WITH_GRAPH_CHANGES)
    if not isinstance(saved, dict) or saved.get("format") not in formats or any(k not in saved for k in _KEYS):
        raise ValueError(f"{path!r} is not an adaround_ext quantized model ({' or '.join(formats)})")
    model = copy.deepcopy(model).eval()
    for name in saved["folded_batchnorm"]:
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path!r} folded a BatchNorm {name!r} that the model does not have") from exc
        set_submodule(model, name, nn.Identity())
    model.adaround_folded_batchnorm = list(saved["folded_batchnorm"])  # a later save_quantized keeps them
    for name, channel_dim in saved.get("channel_clips", {}).items():
        upper = saved["state"].get(f"{name}.upper")
        try:
            model.get_submodule(name)
        except AttributeError:
            upper = None
        if upper is None:
            raise ValueError(f"{path!r}: the activation {name!r} that cross-layer equalization changed is missing "
                             f"from the model or the file")
        set_submodule(model, name, ChannelClip(upper, channel_dim))
    model.adaround_channel_clips = sorted(saved.get("channel_clips", {}))
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
    outputs = saved.get("output_quantizers") or {}
    if outputs:
        model = _place_saved_output_quantizers(model, outputs, path)
        model.adaround_folded_batchnorm = list(saved["folded_batchnorm"])
        model.adaround_channel_clips = sorted(saved.get("channel_clips", {}))
    skipped = tuple(name + "." for name in saved["layers"]) + ((SLOTS + ".",) if outputs else ())
    result = model.load_state_dict(saved["state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skipped)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path!r} does not fit the model: parameters missing from the file {missing}, "
                         f"in the file but not in the model {result.unexpected_keys}")
    return model


def _place_saved_output_quantizers(model: nn.Module, outputs: dict, path: str) -> nn.Module:
    """The model with its op-output quantizers placed as when it was saved, and loaded from the file."""
    placed = place_output_quantizers(model)
    slots = set(output_quantizer_slots(placed))
    if slots != set(outputs):
        raise ValueError(f"{path!r}: the file's activation quantizers do not fit the model's graph: only in the "
                         f"file {sorted(set(outputs) - slots)}, only in the model {sorted(slots - set(outputs))}")
    set_output_quantizers(placed, {key: ActivationQuantizer(*state) for key, state in outputs.items()})
    return placed
