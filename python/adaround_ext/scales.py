"""Weight scale (and zero point) initialisation: min-max, or the weight-MSE clipping search."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._ops import hard_quantize, quant_range
from .activation_ranges import activation_grid as init_activation_grid  # noqa: F401  (the activation grid)

# Clipping ratios tried by the MSE search (docs/algorithm.md#quantization-grid).
MSE_RATIOS = torch.linspace(0.3, 1.0, 71).tolist()


def _reduce_dims(weight: torch.Tensor, axis: Optional[int]):
    return tuple(d for d in range(weight.dim()) if d != axis)


def _grid_for_range(lo, hi, bits: int, symmetric: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    n, p = quant_range(bits, symmetric)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()) / p
        return scale.clamp_min(tiny), None
    lo = torch.minimum(lo, torch.zeros_like(lo))  # zero must be representable
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (p - n)).clamp_min(tiny)
    zero_point = torch.round(-lo / scale).clamp(n, p)
    return scale, zero_point


def init_weight_grid(weight: torch.Tensor, bits: int, per_channel: bool, symmetric: bool, method: str,
                     channel_axis: int = 0):
    """Returns (scale, zero_point or None, quant_min, quant_max, axis) for the weight; per-channel grids
    lie along `channel_axis` (the output channels: 0, or 1 for a transposed convolution)."""
    n, p = quant_range(bits, symmetric)
    w = weight.detach().float()
    axis = channel_axis if per_channel else None
    dims = _reduce_dims(w, axis)
    lo, hi = w.amin(dim=dims), w.amax(dim=dims)
    if method == "minmax":
        scale, zp = _grid_for_range(lo, hi, bits, symmetric)
        return scale, zp, n, p, axis
    best_err = None
    best = None
    for ratio in MSE_RATIOS:
        scale, zp = _grid_for_range(lo * ratio, hi * ratio, bits, symmetric)
        deq = hard_quantize(w, scale, zp, n, p, axis, "nearest")[1]
        err = (deq - w).pow(2).sum(dim=dims)
        if best_err is None:
            best_err, best = err, (scale, zp)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]),
                None if zp is None else torch.where(better, zp, best[1]))
    return best[0], best[1], n, p, axis
