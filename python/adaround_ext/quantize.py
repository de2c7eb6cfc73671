"""The model pipeline (docs/design.md#pipeline): fold BN (optionally equalize), initialise weight grids, learn the rounding of each
Conv/Linear layer in execution order with torch.ops.adaround.optimize_layer, calibrate 8-bit
activations."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Callable, Iterable, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _C
from .blocks import Block, BlockLayer, block_module, find_blocks, reconstruct_block
from .caching import CHUNK, PrefixCaches, make_layer_caches, walkable_graph
from ._ops import hard_quantize, optimize_layer
from .checkpoint import Checkpoint, fingerprint
from .config import QuantConfig
from .layer_kinds import LAYER_KINDS
from .equalize import equalize
from .folding import conv_bn_pairs, fold_batchnorm
from .modules import (ActivationQuantizer, ChannelClip, QuantizedLayer, channel_axis, float_weight_layers, geometry,
                      is_transposed, layer_kind, set_submodule, trace)
from .report import LayerReport, QuantizationReport
from .activation_ranges import RangeObserver
from .placement import aimet_key_of, output_quantizer_slots, place_output_quantizers, set_output_quantizers
from .scales import init_activation_grid, init_weight_grid

log = logging.getLogger("adaround_ext")

CalibrationData = Union[torch.Tensor, Iterable]


def collect_samples(data: CalibrationData, limit: int) -> torch.Tensor:
    """First `limit` samples of a tensor, a DataLoader or any iterable of batches (labels ignored)."""
    if isinstance(data, torch.Tensor):
        batches = [data]
    else:
        batches = data
    taken, count = [], 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError("calibration_data yielded an empty batch")
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"calibration batches must be tensors (or tuples whose first item is one), got "
                             f"{type(batch).__name__}")
        if batch.dim() == 0:
            raise ValueError("calibration batches must have a batch dimension")
        taken.append(batch[: limit - count].detach().cpu())
        count += taken[-1].shape[0]
        if count >= limit:
            break
    if count == 0:
        raise ValueError("calibration_data yielded no samples")
    shapes = {tuple(t.shape[1:]) for t in taken}
    if len(shapes) != 1:
        raise ValueError(f"calibration batches have different sample shapes: {sorted(shapes)}")
    samples = torch.cat(taken).float()
    finite = torch.isfinite(samples).flatten(1).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"calibration_data holds NaN or Inf in {len(bad)} of {len(samples)} samples (the first is "
                         f"sample {bad[0].item()})")
    return samples


def execution_order(model: nn.Module, example: torch.Tensor) -> List[str]:
    """Names of the Conv/Linear layers in the order a forward pass calls them."""
    order, handles = [], []
    for name, module in model.named_modules():
        if layer_kind(module) is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))  # a layer called twice is quantized once


def following_activations(model: nn.Module) -> dict:
    """For each Conv/Linear, the activation applied to its output alone: relu, relu6 or none."""
    try:
        graph = trace(model)
    except Exception as exc:  # untraceable model: the loss uses no activation
        log.warning("could not trace the model (%s); reconstruction losses use no activation", exc)
        return {}
    modules = dict(model.named_modules())

    def kind_of(node):
        if node.op == "call_module":
            m = modules.get(node.target)
            if isinstance(m, nn.ReLU):
                return "relu"
            if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
                return "relu6"
            if isinstance(m, nn.Identity):
                return "identity"
            if isinstance(m, ChannelClip):  # an equalized ReLU6; the loss does not model its channel bounds
                return "relu"
        if node.op == "call_function" and node.target in (F.relu, torch.relu):
            return "relu"
        if node.op == "call_function" and node.target is F.relu6:
            return "relu6"
        if node.op == "call_method" and node.target == "relu":
            return "relu"
        return None

    result = {}
    for node in graph.nodes:
        if node.op != "call_module" or layer_kind(modules.get(node.target)) is None:
            continue
        current, act = node, "none"
        while len(current.users) == 1:
            user = next(iter(current.users))
            kind = kind_of(user)
            if kind == "identity":  # a folded BatchNorm
                current = user
                continue
            act = kind or "none"
            break
        result[node.target] = act
    return result


def _rounded_up_fraction(weight, codes, scale, zero_point, axis):
    shape = [1] * weight.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape if axis is not None else ())
    z = 0 if zero_point is None else zero_point.reshape(shape if axis is not None else ())
    return (codes.float() > torch.floor(weight.float() / s) + z).float().mean().item()


def _observe_inputs(model: nn.Module, targets: dict, samples: torch.Tensor, bits: int, device, chunk, method,
                    percentile, what: str) -> dict:
    """Runs the model over the samples and returns {name: (lo, hi)}, the range `method` gives for
    the input of each module in `targets` that was called; `what` names it in errors."""
    observers, handles = {}, []
    for name, module in targets.items():
        observers[name] = RangeObserver()
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: observers[name].observe(args[0])))
    try:
        with torch.no_grad():
            for batch in samples.split(chunk):
                model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: _calibrated_range(observer, bits, method, percentile, prefix=f"{what} {name}: ")
            for name, observer in observers.items() if observer.observed}


def calibrate_activations(model: nn.Module, samples: torch.Tensor, bits: int, device, chunk=128,
                          method: str = "minmax", percentile: float = 99.99) -> dict:
    """Calibrates the per-tensor range of every activation quantizer by `method` (activation_ranges.py)
    with activations in float, and installs the quantizers: each quantized layer's input quantizer, or
    with output quantizers (placement.py) those. Returns {layer or AIMET tensor name: (lo, hi)}."""
    slots = output_quantizer_slots(model)
    if slots:
        set_output_quantizers(model, {key: nn.Identity() for key in slots})  # observed in float
        ranges = _observe_inputs(model, output_quantizer_slots(model), samples, bits, device, chunk, method, percentile, "activation")
        set_output_quantizers(model, {key: _input_quantizer(r, bits).to(device) for key, r in ranges.items()})
        return {"{} {} {}".format(*aimet_key_of(model, key)): r for key, r in ranges.items()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    for module in layers.values():
        module.input_quantizer = None
    ranges = _observe_inputs(model, layers, samples, bits, device, chunk, method, percentile, "layer")
    for name, value_range in ranges.items():
        layers[name].input_quantizer = _input_quantizer(value_range, bits).to(device)
    return ranges


def quantize(model: nn.Module, calibration_data: CalibrationData, config: Optional[QuantConfig] = None, *,
             checkpoint_dir: Optional[str] = None,
             on_layer_done: Optional[Callable[[int, str], None]] = None) -> nn.Module:
    """Returns a quantized copy of `model` (the original is untouched).

    The copy has BatchNorm folded (and, with cross_layer_equalization, the model equalized), every
    Conv/Linear replaced by a QuantizedLayer (integer codes and grid) and, with activation_bits,
    activation quantizers on the layers' inputs or, with activation_placement="outputs", on op
    outputs (the copy is then a torch.fx GraphModule). Its `adaround_report` holds the
    per-layer report. With `checkpoint_dir`, each finished layer is saved there and a rerun with
    the same arguments resumes after the last finished layer.
    """
    config = config or QuantConfig()
    config.validate()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() and _C.cuda_compiled else "cpu"))
    report = QuantizationReport(device=str(device), config=config.to_dict())
    t0 = time.perf_counter()
    samples = collect_samples(calibration_data, config.num_samples)

    fp_model = copy.deepcopy(model).float().to(device).eval()
    folded = [bn for _, bn in conv_bn_pairs(fp_model)] if _traceable(fp_model) else []
    if config.cross_layer_equalization:  # before the weight grids are chosen; it folds BN itself
        equalize(fp_model)
    elif folded:
        fold_batchnorm(fp_model)
    try:
        layers = execution_order(fp_model, samples[:2].to(device, copy=True))  # the model may change its input
    except Exception as exc:
        raise ValueError(f"calibration samples of shape {tuple(samples.shape[1:])} do not fit the model: {exc}") from exc
    if not layers:
        raise ValueError("the model has no Linear, Conv1d/2d or ConvTranspose1d/2d layer to quantize")
    if config.rounding == "adaround" and config.mode != "exact" and config.batch_size > len(samples):
        raise ValueError(f"batch_size ({config.batch_size}) is larger than the {len(samples)} calibration samples; "
                         f"pass more samples or lower QuantConfig.batch_size")
    report.kept_float = float_weight_layers(fp_model, set(layers))
    if report.kept_float:
        log.warning("these weights stay in floating point (not quantizable here): %s", ", ".join(report.kept_float))
    activations = following_activations(fp_model) if config.loss_activation == "auto" else {}
    ckpt = Checkpoint(checkpoint_dir, fingerprint(fp_model, samples, config)) if checkpoint_dir else None

    q_model = copy.deepcopy(fp_model)
    caches = None  # built on the first unit that needs caches
    blocks = []
    if config.reconstruction == "block" and config.rounding == "adaround":
        caches = make_layer_caches(q_model, fp_model, samples, config, device, layers)
        report.cache_strategy = caches.strategy
        blocks = _blocks(fp_model, layers, config, caches)
    index_of = {name: i for i, name in enumerate(layers)}
    for unit in _progress(_units(layers, blocks), config):
        if isinstance(unit, Block):
            saved = ckpt.load(unit.name, kind="block") if ckpt else None
            if saved is not None:
                states = saved["state"]["layers"]
                layer_reports = [LayerReport(**r) for r in saved["report"]["layers"]]
            else:
                with _errors_named(f"block {unit.name}"):
                    states, layer_reports = _quantize_block(caches, unit, fp_model, index_of, config)
                if ckpt:
                    ckpt.save(unit.name, {"layers": states}, {"layers": [r.to_dict() for r in layer_reports]},
                              kind="block")
        else:
            name = unit
            saved = ckpt.load(name) if ckpt else None
            if saved is not None:
                state, layer_report = saved["state"], LayerReport(**saved["report"])
            else:
                if caches is None and config.rounding == "adaround":
                    caches = make_layer_caches(q_model, fp_model, samples, config, device, layers)
                    report.cache_strategy = caches.strategy
                module = fp_model.get_submodule(name)
                bits = config.layer_bits(index_of[name], len(layers))
                with _errors_named(f"layer {name}"):
                    state, layer_report = _quantize_layer(caches, name, module, layer_kind(module), bits,
                                                          index_of[name], activations, config)
                if ckpt:
                    ckpt.save(name, state, layer_report.to_dict())
            states, layer_reports = {name: state}, [layer_report]
        for layer_report in layer_reports:
            name = layer_report.name
            _install(q_model, fp_model.get_submodule(name), name, states[name], config, device)
            report.layers.append(layer_report)
            if on_layer_done:
                on_layer_done(index_of[name], name)

    report.cache_seconds = sum(r.cache_seconds for r in report.layers)
    report.optimize_seconds = sum(r.seconds for r in report.layers)
    t_cal = time.perf_counter()
    if config.activation_bits is not None and config.activation_placement == "outputs":
        q_model = place_output_quantizers(q_model)
    if config.activation_bits is not None and not config.activations_in_reconstruction:
        ranges = calibrate_activations(q_model, samples, config.activation_bits, device,
                                       method=config.activation_range, percentile=config.activation_percentile)
        if config.activation_placement == "outputs":
            report.activation_ranges = ranges
        for layer_report in report.layers:
            layer_report.input_range = ranges.get(layer_report.name)
    report.calibrate_seconds = time.perf_counter() - t_cal
    report.total_seconds = time.perf_counter() - t0
    q_model.adaround_report = report
    q_model.adaround_folded_batchnorm = folded
    q_model.adaround_channel_clips = getattr(fp_model, "adaround_channel_clips", [])
    return q_model


@contextlib.contextmanager
def _errors_named(what: str):
    """Re-raises a ValueError or RuntimeError as the same kind of error, prefixed with `what`."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        kind_of_error = RuntimeError if isinstance(exc, RuntimeError) else ValueError
        raise kind_of_error(f"{what}: {exc}") from exc


def _install(q_model, module, name, state, config, device) -> None:
    """Puts layer `name`'s QuantizedLayer (from its finished state) into q_model, with its input quantizer
    where the walk set one: later units' x^ see it."""
    state = dict(state)
    input_range, input_grid = state.pop("input_range", None), state.pop("input_grid", None)
    kind = layer_kind(module)
    layer = QuantizedLayer(kind, bias=module.bias, **state, **geometry(module))
    if input_grid is not None:  # learned with the block (blocks.py)
        layer.input_quantizer = ActivationQuantizer(*input_grid)
    elif input_range is not None:
        layer.input_quantizer = _input_quantizer(input_range, config.activation_bits)
    set_submodule(q_model, name, layer.to(device))


def _blocks(fp_model, layers, config, caches) -> list:
    """The blocks reconstruct_block learns, in execution order (blocks.find_blocks)."""
    graph = walkable_graph(fp_model, layers)
    if graph is None:
        raise ValueError("reconstruction='block' needs a model that torch.fx can trace, with one input and each "
                         "quantized layer called once")
    blocks = find_blocks(fp_model, graph, layers, config.blocks)
    if isinstance(caches, PrefixCaches):  # its caches hook modules: spans of the top-level graph have none
        for block in blocks:
            if not block.is_module:
                log.warning("the span ending at %s is reconstructed layer by layer: the graph walk's caches do "
                            "not fit in memory", block.name)
        blocks = [b for b in blocks if b.is_module]
    log.info("block reconstruction: %d blocks (%s)", len(blocks), ", ".join(b.name for b in blocks))
    return blocks


def _units(layers, blocks) -> list:
    """The reconstruction units in execution order: a Block, or the name of a layer outside every block."""
    owner = {name: block for block in blocks for name in block.layers}
    units = []
    for name in layers:
        unit = owner.get(name, name)
        if not units or units[-1] is not unit:
            units.append(unit)
    return units


def _quantize_block(caches, block, fp_model, index_of, config):
    """Each layer's state and report for a block learned by reconstruct_block; errors name no block."""
    t_cache = time.perf_counter()
    inputs, targets = caches.build_block(block)
    cache_seconds = time.perf_counter() - t_cache
    members, bits = [], {}
    for name in block.layers:
        module = fp_model.get_submodule(name)
        kind = layer_kind(module)
        weight = module.weight.detach()
        bits[name] = config.layer_bits(index_of[name], len(index_of))
        with _errors_named(f"layer {name}"):
            grid = _weight_grid(weight, kind, bits[name], config)
        bias = None if module.bias is None else module.bias.detach()
        members.append(BlockLayer(name, kind, weight, bias, geometry(module), *grid))
    activation_bits = config.activation_bits if config.activations_in_reconstruction else None
    fp_model.requires_grad_(False)  # autograd follows the soft weights (and learned steps) only
    result = reconstruct_block(block_module(fp_model, block), members, inputs, targets, config,
                               seed=config.seed * 1000 + index_of[block.layers[0]], activation_bits=activation_bits,
                               progress=block.name if config.progress else None)
    location = "pinned host" if inputs.device.type != caches.device.type else str(caches.device)
    states, reports = {}, []
    for member in members:
        codes = result.codes[member.name]
        grid = result.input_grids.get(member.name)
        report = LayerReport(name=member.name, kind=member.kind, shape=tuple(member.weight.shape),
                             bits=bits[member.name], loss_activation="none",
                             mode="block", block=block.name, nearest_error=result.nearest_error,
                             adaround_error=result.adaround_error,
                             undecided_fraction=result.undecided_fraction[member.name],
                             seconds=result.seconds / len(members), cache_seconds=cache_seconds / len(members),
                             cache_location=location, loss_curve=result.loss_curve.tolist(),
                             input_range=None if grid is None else _grid_range(grid))
        report.rounded_up_fraction = _rounded_up_fraction(member.weight, codes, member.scale, member.zero_point,
                                                          member.axis)
        states[member.name] = _finished_state(codes, member.scale, member.zero_point, member.quant_min,
                                              member.quant_max, member.axis, input_grid=grid)
        reports.append(report)
    return states, reports


def _grid_range(grid) -> tuple:
    """The [lo, hi] an activation grid (scale, zero_point, quant_min, quant_max) covers."""
    scale, zero_point, quant_min, quant_max = grid
    return (quant_min - zero_point) * scale, (quant_max - zero_point) * scale


def _input_quantizer(value_range, bits: int) -> ActivationQuantizer:
    """A layer's input quantizer for the calibrated (min, max) of its input."""
    return ActivationQuantizer(*init_activation_grid(*value_range, bits))


def _calibrated_range(observer: RangeObserver, bits: int, method: str, percentile: float, prefix: str = ""):
    """The range `method` gives for the observed input; an error when the input held NaN or Inf."""
    if not (math.isfinite(observer.lo) and math.isfinite(observer.hi)):
        raise ValueError(f"{prefix}its input holds NaN or Inf (an earlier layer's output overflowed float32)")
    return observer.range(method, bits, percentile)


def _quantize_inputs_(inputs, config):
    """Calibrates the layer's input quantizer on its cached x^ (QuantConfig.activation_range) and applies
    it to the cache in place; returns the range."""
    observer = RangeObserver()
    for part in inputs.split(CHUNK):
        observer.observe(part)
    value_range = _calibrated_range(observer, config.activation_bits, config.activation_range,
                                    config.activation_percentile)
    quantizer = _input_quantizer(value_range, config.activation_bits)
    for part in inputs.split(CHUNK):
        part.copy_(quantizer(part))
    return value_range


def _traceable(model: nn.Module) -> bool:
    try:
        trace(model)
        return True
    except Exception as exc:
        log.warning("could not trace the model (%s); BatchNorm is not folded", exc)
        return False


def _progress(units, config):
    if not config.progress:
        return units
    from tqdm.auto import tqdm

    return tqdm(units, desc=f"{config.rounding} W{config.weight_bits}", unit="unit")


def _weight_grid(weight, kind, bits, config):
    """(scale, zero_point, quant_min, quant_max, axis) of a layer's weight; an error if it is not finite."""
    if not torch.isfinite(weight).all():
        raise ValueError("its weight holds NaN or Inf")
    return init_weight_grid(weight, bits, config.per_channel, config.symmetric, config.scale_method,
                            channel_axis=channel_axis(kind))


def _finished_state(codes, scale, zero_point, quant_min, quant_max, axis, **input_quantizer) -> dict:
    """What a checkpoint keeps of a finished layer and _install builds its QuantizedLayer from."""
    return dict(codes=codes.cpu(), scale=scale.cpu(), zero_point=None if zero_point is None else zero_point.cpu(),
                quant_min=quant_min, quant_max=quant_max, axis=axis, **input_quantizer)


def _quantize_layer(caches, name, module, kind, bits, index, activations, config):
    """One layer's codes, grid and report; errors name no layer (the caller adds it)."""
    weight = module.weight.detach()
    scale, zero_point, n, p, axis = _weight_grid(weight, kind, bits, config)
    activation = activations.get(name, "none") if config.loss_activation == "auto" else config.loss_activation
    report = LayerReport(name=name, kind=kind, shape=tuple(weight.shape), bits=bits, loss_activation=activation)
    seed = config.seed * 1000 + index
    input_range = None  # set where this layer's input quantizer is calibrated here (not afterwards)
    if config.rounding == "adaround":
        t_cache = time.perf_counter()
        inputs, targets = caches.build(name, activation)
        batch_size = config.batch_size
        if not LAYER_KINDS[kind].is_conv and inputs.dim() > 2:
            # A Linear over tokens (e.g. a transformer's MLP): every position is one row of the
            # reconstruction, and a minibatch draws as many rows as batch_size samples hold.
            batch_size *= inputs[0].numel() // inputs.shape[-1]
            inputs, targets = inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1, targets.shape[-1])
        if config.activations_in_reconstruction:
            input_range = report.input_range = _quantize_inputs_(inputs, config)
        report.cache_seconds = time.perf_counter() - t_cache
        device = caches.device
        streamed = inputs.device.type != device.type  # CPU caches for a CUDA loop
        report.cache_location = "pinned host" if streamed else str(device)
        log.info("layer %s: caches %s (%.1f MB)%s", name, report.cache_location,
                 (inputs.numel() + targets.numel()) * 4 / 2**20,
                 ", streamed to the GPU per minibatch" if streamed else "")
        t_opt = time.perf_counter()
        options = dict(config.loop_options(), batch_size=batch_size, activation=activation, seed=seed)
        result = optimize_layer(weight, module.bias, scale, zero_point, n, p, axis, inputs, targets,
                                **geometry(module), transposed=is_transposed(kind),
                                progress=name if config.progress else None, **options)
        report.seconds = time.perf_counter() - t_opt
        codes = result.codes
        report.mode = "exact" if result.exact_mode else "minibatch"
        report.nearest_error = result.nearest_error
        report.adaround_error = result.adaround_error
        report.undecided_fraction = result.undecided_fraction
        report.loss_curve = result.loss_curve.tolist()
        del inputs, targets
    else:
        gen = torch.Generator(device=weight.device).manual_seed(seed)
        codes = hard_quantize(weight, scale, zero_point, n, p, axis, config.rounding, generator=gen)[0]
        report.mode = config.rounding
    report.rounded_up_fraction = _rounded_up_fraction(weight, codes, scale, zero_point, axis)
    return _finished_state(codes, scale, zero_point, n, p, axis, input_range=input_range), report
