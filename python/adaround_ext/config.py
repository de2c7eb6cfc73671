"""QuantConfig: every knob of the pipeline and its default (docs/algorithm.md explains each one)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import _C  # registers torch.ops.adaround.optimize_layer, whose schema holds the loop's defaults
from .activation_ranges import RANGE_METHODS as ACTIVATION_RANGES
from .placement import PLACEMENTS as ACTIVATION_PLACEMENTS

ROUNDINGS = ("adaround", "nearest", "floor", "ceil", "stochastic")
SCALE_METHODS = ("minmax", "mse")
LOSS_ACTIVATIONS = ("auto", "none", "relu", "relu6")
CACHE_PLACEMENTS = ("auto", "device", "host")
RECONSTRUCTIONS = ("layer", "block")
INNER_ACTIVATIONS = ("auto", "float", "quantized")


def _loop_defaults() -> dict:
    """optimize_layer's options and their defaults, read from the op's schema (the C++ side lists them
    once, csrc/optimize_options.h)."""
    schema = torch.ops.adaround.optimize_layer.default._schema
    return {a.name: a.default_value for a in schema.arguments if a.has_default_value()}


LOOP_DEFAULTS = _loop_defaults()
# quantized_inputs=None turns it on up to this activation bit width.
QUANTIZED_INPUTS_MAX_BITS = 4
# The QuantConfig fields that are optimize_layer options of the same name: their defaults come from
# the op, and the op's own check validates them (each layer's activation and seed are set per layer).
LOOP_FIELDS = ("iterations", "batch_size", "lr", "reg_lambda", "beta_start", "beta_end", "warm_start", "schedule",
               "mode", "cuda_graph")
# The Python types each annotation admits (bool is an int to Python, never a count here).
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "tuple": (tuple, list)}


@dataclass
class QuantConfig:
    weight_bits: int = 4
    activation_bits: Optional[int] = 8  # None: weights only (A32)
    per_channel: bool = True  # one scale per output channel, else one per layer
    symmetric: bool = True  # signed [-2^(b-1), 2^(b-1)-1], else unsigned with a zero point
    scale_method: str = "mse"  # "minmax" or "mse" (best clipping ratio for nearest rounding)
    first_layer_bits: Optional[int] = None  # None: weight_bits
    last_layer_bits: Optional[int] = None
    rounding: str = "adaround"  # or a baseline: nearest, floor, ceil, stochastic
    iterations: int = LOOP_DEFAULTS["iterations"]
    batch_size: int = LOOP_DEFAULTS["batch_size"]
    lr: float = LOOP_DEFAULTS["lr"]
    reg_lambda: float = LOOP_DEFAULTS["reg_lambda"]
    beta_start: float = LOOP_DEFAULTS["beta_start"]
    beta_end: float = LOOP_DEFAULTS["beta_end"]
    warm_start: float = LOOP_DEFAULTS["warm_start"]
    schedule: str = LOOP_DEFAULTS["schedule"]
    loss_activation: str = "auto"  # "auto": the ReLU/ReLU6 that follows the layer, if any
    asymmetric_reconstruction: bool = True  # inputs from the partly quantized model (x^)
    # With activation_bits and asymmetric reconstruction: each layer's x^ passes through the layer's own
    # input quantizer, calibrated on x^ when the walk reaches the layer, so AdaRound learns against the
    # inputs the quantized model will feed it (docs/algorithm.md#asymmetric-reconstruction).
    # None (the default): on at activation_bits <= 4 with input quantizers (activation_placement
    # "inputs"), off otherwise. Off, activations stay in float during AdaRound and are calibrated
    # afterwards, as AIMET does, which scored higher at W4A8 on the testbed
    # (benchmarks/results/2026-12-01-readme-history.md); at 4-bit activations learning against them
    # scored up to 4 points higher layer-wise and 6 in block mode (benchmarks/README.md).
    quantized_inputs: Optional[bool] = None
    # How each activation quantizer's range is calibrated (activation_ranges.py): "minmax" (the observed
    # range), "mse" (the clipping with the least quantization error) or "percentile", the default: within
    # 0.1 point of min/max or above it on the testbed's resnet18 and mobilenet_v2, and 3-5 points above
    # it on an outlier-heavy resnet50 (benchmarks/README.md, activation ranges).
    activation_range: str = "percentile"
    # Where activation quantizers sit (placement.py): "inputs" (each quantized layer's input) or "outputs"
    # (the model input and op outputs, as AIMET's default configuration and integer runtimes place them).
    activation_placement: str = "inputs"
    activation_percentile: float = 99.99  # with activation_range="percentile": the percentile kept at each end
    # Cross-layer equalization with high-bias absorption before the weight grids are chosen
    # (equalize.py): for per-tensor grids on models whose channels' ranges differ widely (depthwise convs).
    cross_layer_equalization: bool = False
    # What AdaRound reconstructs (blocks.py, docs/algorithm.md#block-reconstruction): "layer", each
    # Conv/Linear's output (the paper), or "block", each residual block's output with the rounding of all
    # its layers learned jointly (BRECQ); layers outside any block are still reconstructed one by one.
    reconstruction: str = "layer"
    # With reconstruction="block": the module names of the blocks (None: found in the model, see
    # blocks.find_blocks).
    blocks: Optional[tuple] = None
    # With reconstruction="block" and activation_bits, activation quantizers sit inside the block during
    # its reconstruction (as with quantized_inputs) when quantized_inputs, activation_drop > 0 or
    # learn_activation_steps is set. activation_drop: the probability that an activation element keeps
    # its float value during reconstruction (QDrop; always quantized at evaluation).
    activation_drop: float = 0.0
    # Learn each in-block activation quantizer's step size with the rounding (the LSQ gradient), by Adam
    # at activation_step_lr, annealed to 0 by a cosine over the iterations.
    learn_activation_steps: bool = False
    activation_step_lr: float = 4e-5
    # With activation quantizers in block reconstruction: whether the activations a block computes itself
    # (the inputs of its layers that read another of its layers' output) are quantized while its
    # rounding is learned ("quantized") or stay float ("float"; their quantizers, calibrated the same
    # way, act at evaluation), the quantizers of the block's own input acting either way. "auto":
    # "quantized" with activation_drop > 0 or learn_activation_steps, which act on those quantizers,
    # else "float", which scored higher on resnet18 W2A4 (benchmarks/README.md).
    inner_activations: str = "auto"
    mode: str = LOOP_DEFAULTS["mode"]  # minibatch, exact (full-data Gram, identity loss only) or auto
    num_samples: int = 1024
    # Where the per-layer caches live: "device" (with the weights), "host" (pinned CPU memory, streamed
    # to the GPU a minibatch at a time; CUDA only) or "auto" (device when they fit in free GPU memory).
    cache_placement: str = "auto"
    device: Optional[str] = None  # None: cuda when available, else cpu
    # CUDA with the caches on the GPU: replay each iteration from a captured CUDA graph. The same
    # result; off by default until it has run on a GPU (docs/design.md#cuda-graph).
    cuda_graph: bool = LOOP_DEFAULTS["cuda_graph"]
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self._validate_types()
        for name in ("weight_bits", "activation_bits", "first_layer_bits", "last_layer_bits"):
            bits = getattr(self, name)
            if bits is None and name != "weight_bits":
                continue
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{name} must be an integer from 2 to 8, got {bits!r}")
        choices = dict(rounding=ROUNDINGS, scale_method=SCALE_METHODS, loss_activation=LOSS_ACTIVATIONS,
                       cache_placement=CACHE_PLACEMENTS, activation_range=ACTIVATION_RANGES,
                       activation_placement=ACTIVATION_PLACEMENTS, reconstruction=RECONSTRUCTIONS,
                       inner_activations=INNER_ACTIVATIONS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not 50 < self.activation_percentile <= 100:
            raise ValueError(f"activation_percentile must be in (50, 100], got {self.activation_percentile}")
        if self.activation_placement == "outputs" and self.quantized_inputs is True:
            raise ValueError("quantized_inputs calibrates each layer's input quantizer during the walk; it needs "
                             "activation_placement='inputs'")
        self._validate_block_options()
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {self.num_samples}")
        _C.check_optimize_options(**self.loop_options())

    def _validate_block_options(self) -> None:
        if not 0.0 <= self.activation_drop <= 1.0:
            raise ValueError(f"activation_drop must be in [0, 1], got {self.activation_drop}")
        if not self.activation_step_lr > 0:
            raise ValueError(f"activation_step_lr must be > 0, got {self.activation_step_lr}")
        if self.reconstruction == "block" and self.rounding != "adaround":
            raise ValueError(f"reconstruction='block' learns each block's rounding; it needs rounding='adaround' "
                             f"(got {self.rounding!r})")
        block_only = dict(blocks=self.blocks is not None, activation_drop=self.activation_drop > 0,
                          learn_activation_steps=self.learn_activation_steps,
                          inner_activations=self.inner_activations != "auto")
        for name, given in block_only.items():
            if given and self.reconstruction != "block":
                raise ValueError(f"{name} needs reconstruction='block' (got {self.reconstruction!r})")
        if self.blocks is not None:
            if not self.blocks or not all(isinstance(b, str) and b for b in self.blocks):
                raise ValueError(f"blocks must be a non-empty list of module names, got {self.blocks!r}")
            if len(set(self.blocks)) != len(self.blocks):
                raise ValueError(f"blocks names a module twice: {list(self.blocks)!r}")
        if self.inner_activations != "auto" and not self.activations_in_reconstruction:  # block mode, checked above
            # Without activation quantizers in the loop every activation is float while a block learns,
            # so the choice would be ignored: refuse it rather than label a run with what it did not do.
            raise ValueError(f"inner_activations={self.inner_activations!r} needs activation quantizers in the "
                             "reconstruction (activation_bits with quantized_inputs, activation_drop > 0 or "
                             "learn_activation_steps, and asymmetric_reconstruction=True); leave it 'auto'")
        if self.activation_drop > 0 or self.learn_activation_steps:
            if self.activation_bits is None:
                raise ValueError("activation_drop and learn_activation_steps act on activation quantizers; they "
                                 "need activation_bits")
            if self.activation_placement != "inputs":
                raise ValueError("activation_drop and learn_activation_steps quantize each layer's input inside the "
                                 "block; they need activation_placement='inputs'")
            if not self.asymmetric_reconstruction:
                raise ValueError("activation_drop and learn_activation_steps need asymmetric_reconstruction=True")

    @property
    def activations_in_reconstruction(self) -> bool:
        """Whether each layer's input quantizer is calibrated, and applied, while the rounding is learned
        (on x^ during the walk) rather than calibrated afterwards with the whole model."""
        if self.rounding != "adaround" or self.activation_bits is None or not self.asymmetric_reconstruction:
            return False
        return self.inputs_quantized or (self.reconstruction == "block" and (
            self.activation_drop > 0 or self.learn_activation_steps))

    @property
    def inputs_quantized(self) -> bool:
        """quantized_inputs, its default (None) resolved: on for activation_bits <= 4 where input
        quantizers exist (activation_placement='inputs')."""
        if self.quantized_inputs is not None:
            return self.quantized_inputs
        return (self.activation_bits is not None and self.activation_bits <= QUANTIZED_INPUTS_MAX_BITS
                and self.activation_placement == "inputs")

    @property
    def inner_activations_quantized(self) -> bool:
        """inner_activations, its default ("auto") resolved."""
        if self.inner_activations != "auto":
            return self.inner_activations == "quantized"
        return self.activation_drop > 0 or self.learn_activation_steps

    def loop_options(self) -> dict:
        """The optimize_layer options this configuration sets, by the op's names."""
        return {name: getattr(self, name) for name in LOOP_FIELDS}

    def _validate_types(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = field.type
            optional = kind.startswith("Optional[")
            kind = kind[len("Optional["):-1] if optional else kind
            if value is None and optional:
                continue
            if field.name == "device" and isinstance(value, torch.device):
                continue
            if (kind != "bool" and isinstance(value, bool)) or not isinstance(value, _TYPES[kind]):
                raise TypeError(f"QuantConfig.{field.name} must be {kind}{' or None' if optional else ''}, got "
                                f"{value!r} ({type(value).__name__})")
            if kind == "float" and not math.isfinite(value):
                raise ValueError(f"QuantConfig.{field.name} must be finite, got {value!r}")

    def layer_bits(self, index: int, count: int) -> int:
        if index == 0 and self.first_layer_bits is not None:
            return self.first_layer_bits
        if index == count - 1 and self.last_layer_bits is not None:
            return self.last_layer_bits
        return self.weight_bits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
