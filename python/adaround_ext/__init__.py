"""adaround_ext: AdaRound post-training quantization as PyTorch C++/CUDA ops.

    import adaround_ext
    qmodel = adaround_ext.quantize(model, calibration_loader, adaround_ext.QuantConfig(weight_bits=4))
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.adaround.*)
from ._ops import LayerResult, hard_quantize, init_v, optimize_layer, quant_range, round_regularizer, soft_quantize
from .config import QuantConfig
from .equalize import equalize
from .folding import fold_batchnorm
from .modules import ActivationQuantizer, ChannelClip, QuantizedLayer
from .quantize import quantize
from .report import LayerReport, QuantizationReport
from .serialization import load_quantized, save_quantized

CUDA_COMPILED: bool = _C.cuda_compiled

__all__ = [
    "ActivationQuantizer",
    "CUDA_COMPILED",
    "ChannelClip",
    "LayerReport",
    "LayerResult",
    "QuantConfig",
    "QuantizationReport",
    "QuantizedLayer",
    "equalize",
    "fold_batchnorm",
    "hard_quantize",
    "init_v",
    "load_quantized",
    "optimize_layer",
    "quant_range",
    "quantize",
    "round_regularizer",
    "save_quantized",
    "soft_quantize",
]
