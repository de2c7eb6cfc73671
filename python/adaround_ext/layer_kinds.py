"""The layers quantize() learns the rounding of, in one table: each kind's module type, functional op,
weight layout and output-channel axis. Everything that treats kinds differently reads it here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerKind:
    name: str
    module_type: type
    functional: Callable
    # ConvTranspose: weight [in, out / groups, kernel...], so its output channels are on axis 1.
    transposed: bool = False

    @property
    def channel_axis(self) -> int:
        """The weight axis of the output channels (a per-channel grid's axis)."""
        return 1 if self.transposed else 0

    @property
    def is_conv(self) -> bool:
        return self.module_type is not nn.Linear

    def apply(self, x, w, bias, stride=(1,), padding=(0,), dilation=(1,), groups=1, output_padding=(0,)):
        """The layer's computation with weight `w` and the given geometry."""
        if not self.is_conv:
            return self.functional(x, w, bias)
        if self.transposed:
            return self.functional(x, w, bias, stride, padding, output_padding, groups, dilation)
        return self.functional(x, w, bias, stride, padding, dilation, groups)


LAYER_KINDS = {kind.name: kind for kind in (
    LayerKind("linear", nn.Linear, F.linear),
    LayerKind("conv1d", nn.Conv1d, F.conv1d),
    LayerKind("conv2d", nn.Conv2d, F.conv2d),
    LayerKind("conv_transpose1d", nn.ConvTranspose1d, F.conv_transpose1d, transposed=True),
    LayerKind("conv_transpose2d", nn.ConvTranspose2d, F.conv_transpose2d, transposed=True),
)}
CONV_TYPES = tuple(kind.module_type for kind in LAYER_KINDS.values() if kind.is_conv)


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind of a module (subclasses included, e.g. MultiheadAttention's out_proj is a Linear), or None."""
    for kind in LAYER_KINDS.values():
        if isinstance(module, kind.module_type):
            return kind
    return None
