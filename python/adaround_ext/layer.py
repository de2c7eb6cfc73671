"""Python wrapper of torch.ops.adaround.optimize_layer with a readable result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class LayerResult:
    quantized_weight: torch.Tensor  # scale * (codes - zero_point)
    codes: torch.Tensor  # int8 / uint8 integer codes
    v: torch.Tensor  # learned rounding variables
    loss_curve: torch.Tensor  # sampled total loss
    nearest_error: float  # reconstruction error on the cache with round-to-nearest
    adaround_error: float  # ... with the learned rounding
    undecided_fraction: float  # share of h(V) strictly between 0 and 1
    exact_mode: bool  # whether the full-data (Gram) mode ran


def optimize_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                   zero_point: Optional[torch.Tensor], quant_min: int, quant_max: int, axis: Optional[int],
                   inputs: torch.Tensor, targets: torch.Tensor, stride: Sequence[int] = (1,),
                   padding: Sequence[int] = (0,), dilation: Sequence[int] = (1,), groups: int = 1,
                   **options) -> LayerResult:
    """Learns the rounding of one Linear/Conv1d/Conv2d layer; see csrc/optimize_layer.h.

    options: iterations, batch_size, lr, reg_lambda, beta_start, beta_end, warm_start, schedule,
    activation, mode, seed, log_every, allow_tf32 (SPEC defaults when omitted).
    """
    device = weight.device
    as_device = lambda t: None if t is None else t.detach().to(device)
    out = torch.ops.adaround.optimize_layer(
        weight.detach(), as_device(bias), as_device(scale), as_device(zero_point), int(quant_min), int(quant_max),
        axis, inputs, targets, list(stride), list(padding), list(dilation), int(groups), **options)
    return LayerResult(*out)
