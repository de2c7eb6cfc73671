"""Activation range calibration: the [lo, hi] an activation quantizer covers (docs/algorithm.md#activation-calibration).

- "minmax": the observed range; one outlier sets it.
- "percentile": the given percentile of the values at each end (QuantConfig.activation_percentile).
- "mse": the clipping of the observed range whose quantization error (mean squared, on the
  observed values) is smallest: the search AIMET's tf_enhanced scheme and PyTorch's
  HistogramObserver make, here over a seeded sample of the values.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

RANGE_METHODS = ("minmax", "mse", "percentile")
# Values kept per observed batch: a bounded sample stands for the distribution (all of them when fewer).
SAMPLE_PER_BATCH = 1 << 16
_QUANTILE_LIMIT = 1 << 24  # the most values torch.quantile takes
# Clipping ratios of the observed range tried by the MSE search.
MSE_RATIOS = torch.linspace(0.01, 1.0, 100).tolist()


def activation_grid(lo: float, hi: float, bits: int) -> Tuple[float, int, int, int]:
    """(scale, zero_point, quant_min, quant_max): an unsigned grid over [lo, hi] extended to hold 0."""
    n, p = 0, 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (p - n), 1e-8)
    zero_point = int(round(-lo / scale))
    return scale, min(max(zero_point, n), p), n, p


def _quantization_error(values: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    scale, zero_point, n, p = activation_grid(lo, hi, bits)
    quantized = torch.fake_quantize_per_tensor_affine(values, scale, zero_point, n, p)
    return (quantized - values).pow(2).mean().item()


class RangeObserver:
    """Collects the min, the max and a bounded, seeded sample of the values of one activation."""

    def __init__(self, seed: int = 0):
        self.lo, self.hi = math.inf, -math.inf
        self.observed = False  # whether any value was seen (an all-infinite input also sets lo = inf)
        self._parts = []
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        self.observed = True
        values = x.detach().reshape(-1).float()
        lo, hi = values.min().item(), values.max().item()
        if math.isnan(lo) or math.isnan(hi) or math.isnan(self.lo):
            self.lo = self.hi = math.nan  # stays NaN: the range check names it
            return
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if values.numel() > SAMPLE_PER_BATCH:
            index = torch.randint(values.numel(), (SAMPLE_PER_BATCH,), generator=self._generator)
            values = values[index.to(values.device)]
        # A copy: a view would follow the live activation if a later in-place op rewrote it.
        self._parts.append(values.to("cpu", copy=True))

    def range(self, method: str, bits: int, percentile: float = 99.99) -> Tuple[float, float]:
        """[lo, hi] by `method` (RANGE_METHODS); the observed min/max (NaN after a NaN, +-inf after an
        infinity) where they are not finite."""
        if method not in RANGE_METHODS:
            raise ValueError(f"activation range method must be one of {', '.join(RANGE_METHODS)}, got {method!r}")
        if method == "minmax" or not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return self.lo, self.hi
        values = torch.cat(self._parts)
        if method == "percentile":
            if values.numel() > _QUANTILE_LIMIT:  # torch.quantile's limit: an even subset of the sample
                values = values[torch.randperm(values.numel(), generator=self._generator)[:_QUANTILE_LIMIT]]
            q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0], dtype=torch.float64)
            lo, hi = torch.quantile(values.double(), q).tolist()
            return lo, hi
        best = None
        for ratio in MSE_RATIOS:
            lo, hi = self.lo * ratio, self.hi * ratio
            error = _quantization_error(values, lo, hi, bits)
            if best is None or error < best[0]:
                best = (error, lo, hi)
        return best[1], best[2]
