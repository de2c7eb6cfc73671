"""Per-layer and per-model reports, as data and as printed tables."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple
    bits: int
    loss_activation: str = "none"
    mode: str = ""  # minibatch / exact for AdaRound, block when learned with its block, else the baseline rounding
    # The block the layer was reconstructed with (QuantConfig.reconstruction="block"), "" for one
    # reconstructed alone. Its errors and loss curve are then those of the block's output.
    block: str = ""
    nearest_error: Optional[float] = None
    adaround_error: Optional[float] = None
    undecided_fraction: Optional[float] = None
    rounded_up_fraction: Optional[float] = None
    seconds: float = 0.0  # optimisation
    cache_seconds: float = 0.0
    cache_location: str = ""  # where the caches lived: the device, or "pinned host" (streamed)
    input_range: Optional[tuple] = None  # the calibrated [lo, hi] of the layer's input quantizer
    loss_curve: List[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class QuantizationReport:
    device: str = "cpu"
    config: dict = field(default_factory=dict)
    layers: List[LayerReport] = field(default_factory=list)
    # Modules whose weights stay in float (e.g. "head (Conv3d)", "attn (MultiheadAttention)"): see
    # modules.float_weight_layers.
    kept_float: List[str] = field(default_factory=list)
    # activation_placement="outputs": {"<AIMET module> input|output <index>": (lo, hi)} of each quantizer.
    activation_ranges: Dict[str, tuple] = field(default_factory=dict)
    cache_strategy: str = ""  # "graph walk" or "prefix reruns" (see caching.py); "" without caches
    cache_seconds: float = 0.0
    optimize_seconds: float = 0.0
    calibrate_seconds: float = 0.0
    total_seconds: float = 0.0

    def table(self) -> str:
        fmt = lambda x, spec: "-" if x is None else format(x, spec)
        header = ("layer", "shape", "bits", "f_a", "mode", "block", "nearest", "adaround", "undecided", "up", "input range",
                  "cache", "cache s", "opt s")
        span = lambda r: "-" if r is None else f"[{r[0]:.3g}, {r[1]:.3g}]"
        rows = [(r.name, "x".join(map(str, r.shape)), str(r.bits), r.loss_activation, r.mode, r.block or "-",
                 fmt(r.nearest_error, ".4g"), fmt(r.adaround_error, ".4g"), fmt(r.undecided_fraction, ".2%"),
                 fmt(r.rounded_up_fraction, ".1%"), span(r.input_range), r.cache_location or "-",
                 f"{r.cache_seconds:.1f}", f"{r.seconds:.1f}") for r in self.layers]
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (header, *rows)]
        if self.activation_ranges:
            lines.append("activation quantizers (on op outputs): " + ", ".join(
                f"{name} {span(r)}" for name, r in self.activation_ranges.items()))
        if self.kept_float:
            lines.append("kept in floating point: " + ", ".join(self.kept_float))
        strategy = f" ({self.cache_strategy})" if self.cache_strategy else ""
        lines.append(f"time: caching {self.cache_seconds:.1f} s{strategy}, optimisation {self.optimize_seconds:.1f} s, "
                     f"activation calibration {self.calibrate_seconds:.1f} s, total {self.total_seconds:.1f} s "
                     f"on {self.device}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
