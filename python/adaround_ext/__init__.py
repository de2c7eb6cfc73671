"""adaround_ext: AdaRound post-training quantization as PyTorch C++/CUDA ops."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.adaround.*)
from ._ops import hard_quantize, init_v, quant_range, round_regularizer, soft_quantize

CUDA_COMPILED: bool = _C.cuda_compiled

__all__ = [
    "CUDA_COMPILED",
    "hard_quantize",
    "init_v",
    "quant_range",
    "round_regularizer",
    "soft_quantize",
]
