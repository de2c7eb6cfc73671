"""The Python side of torch.ops.adaround.*: thin wrappers (optimize_layer's with a readable result and a
progress bar), fake (meta) kernels and autograd."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import _C  # registers torch.ops.adaround.*
from .config import LOOP_DEFAULTS

_lib = torch.ops.adaround

__all__ = [
    "LayerResult",
    "optimize_layer",
    "soft_quantize",
    "round_regularizer",
    "hard_quantize",
    "init_v",
    "fake_quantize_activation",
    "channel_clip",
    "rectified_sigmoid",
    "quant_range",
]


def quant_range(bits: int, symmetric: bool = True) -> Tuple[int, int]:
    """Integer grid [n, p] for `bits`: signed symmetric or unsigned asymmetric
    (docs/algorithm.md#quantization-grid)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def soft_quantize(weight, v, scale, zero_point, quant_min, quant_max, axis=None):
    """W~ = s * (clip(floor(W/s) + h(V) + z, n, p) - z). Differentiable in `v` only."""
    return _lib.soft_quantize(weight, v, scale, zero_point, quant_min, quant_max, axis)


def rectified_sigmoid(v):
    """h(V), by the soft_quantize kernel (the kernels' own formula) with W = 0, s = 1, z = 0 on the grid
    [0, 3], which never clips h in [0, 1]."""
    zero, one = v.new_zeros(()), v.new_ones(())
    return _lib.soft_quantize(torch.zeros_like(v), v, one, zero, 0, 3, None)


def round_regularizer(v, beta):
    """sum(1 - |2 h(V) - 1|^beta). Differentiable in `v`."""
    return _lib.round_regularizer(v, float(beta))


def hard_quantize(weight, scale, zero_point, quant_min, quant_max, axis=None, mode="nearest",
                  v=None, generator: Optional[torch.Generator] = None, noise=None):
    """Integer codes and dequantized weights for nearest/floor/ceil/stochastic/adaptive rounding.

    Stochastic rounding draws its uniform noise from `generator` (or takes `noise` directly).
    """
    if mode == "stochastic" and noise is None:
        noise = torch.rand(weight.shape, generator=generator, device=weight.device,
                           dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return _lib.hard_quantize(weight, scale, zero_point, quant_min, quant_max, axis, mode, v, noise)


def init_v(weight, scale, axis=None):
    """V such that h(V) equals the fractional part of W/s (W~ == W inside the grid)."""
    return _lib.init_v(weight, scale, axis)


def fake_quantize_activation(input, scale, zero_point, quant_min, quant_max, clamp_min=None, clamp_max=None,
                             drop_probability=0.0, drop_seed=0):
    """An activation's per-tensor fake quantization as block reconstruction trains it: input clamped to
    [clamp_min, clamp_max] (a fused ReLU/ReLU6; None: no bound), then s * (clip(round(x / s) + z,
    quant_min, quant_max) - z), as torch.fake_quantize_per_tensor_affine. QDrop: each element keeps its
    (clamped) float value with drop_probability, drawn from a hash of drop_seed and the element's
    position in memory (QDropDraw in csrc/rounding_math.h). Differentiable in `input` (straight
    through the rounding) and in `scale` (LSQ's gradient); scale and zero_point are one-element
    tensors."""
    return _lib.fake_quantize_activation(input, scale, zero_point, quant_min, quant_max, clamp_min, clamp_max,
                                         float(drop_probability), int(drop_seed))


def channel_clip(input, upper, dim=1):
    """min(max(input, 0), upper[c]) for each element's channel c along `dim`: a ChannelClip (a ReLU6
    after cross-layer equalization) in one pass, as torch.minimum(input.clamp(min=0), upper) computes
    it. Differentiable in `input`, its gradient passed where 0 < input < upper; `upper` (one bound per
    channel, none NaN or negative) is a constant."""
    return _lib.channel_clip(input, upper, int(dim))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- optimize_layer -------------------------------------------------------------------------

@dataclass
class LayerResult:
    quantized_weight: torch.Tensor  # scale * (codes - zero_point)
    codes: torch.Tensor  # int8 / uint8 integer codes
    v: torch.Tensor  # learned rounding variables (see OptimizeResult::v in csrc/optimize_layer.h)
    loss_curve: torch.Tensor  # sampled total loss
    nearest_error: float  # reconstruction error on the cache with round-to-nearest
    adaround_error: float  # ... with the learned rounding
    undecided_fraction: float  # share of h(V) strictly between 0 and 1
    exact_mode: bool  # whether the full-data (Gram) mode ran


def optimize_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                   zero_point: Optional[torch.Tensor], quant_min: int, quant_max: int, axis: Optional[int],
                   inputs: torch.Tensor, targets: torch.Tensor, stride: Sequence[int] = (1,),
                   padding: Sequence[int] = (0,), dilation: Sequence[int] = (1,), groups: int = 1,
                   transposed: bool = False, output_padding: Sequence[int] = (0,),
                   progress: Optional[str] = None, **options) -> LayerResult:
    """Learns the rounding of one Linear, Conv1d/2d or ConvTranspose1d/2d (transposed: weight
    [in, out / groups, ...]) layer; see csrc/optimize_layer.h.

    options: iterations, batch_size, lr, reg_lambda, beta_start, beta_end, warm_start, schedule,
    activation, mode, seed, log_every, allow_tf32, cuda_graph (the op's defaults when omitted, which
    QuantConfig shares).
    progress: a description to show a tqdm bar over the iterations (None: no bar).
    """
    device = weight.device
    as_device = lambda t: None if t is None else t.detach().to(device)
    total = options.get("iterations", LOOP_DEFAULTS["iterations"])
    bar = _iteration_bar(progress, total) if progress else contextlib.nullcontext()
    with bar:
        try:
            out = torch.ops.adaround.optimize_layer(
                weight.detach(), as_device(bias), as_device(scale), as_device(zero_point), int(quant_min),
                int(quant_max), axis, inputs, targets, list(stride), list(padding), list(dilation), int(groups),
                transposed=bool(transposed), output_padding=list(output_padding), **options)
        except RuntimeError:
            # The loop polls Python's signal handlers and stops when one raised (Ctrl-C): raise that.
            interrupt = _C.take_interrupt()
            if interrupt is not None:
                raise interrupt from None
            raise
    return LayerResult(*out)


@contextlib.contextmanager
def _iteration_bar(description: str, total: int, period: float = 0.25):
    """A tqdm bar fed from the op's progress counter by a polling thread: the C++ loop runs with the
    GIL released, so the bar moves while it runs."""
    from tqdm.auto import tqdm

    stop = threading.Event()
    bar = tqdm(total=int(total), desc=description, unit="it", leave=False)

    def poll():
        while not stop.wait(period):
            bar.update(max(0, min(_C.optimize_progress()[0], bar.total) - bar.n))

    _C.reset_optimize_progress()  # else the previous call's count shows until this one starts
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.update(bar.total - bar.n)
        bar.close()


# ---- fake kernels: shapes and dtypes only, so the ops trace under torch.compile -------------
# They also serve the meta device, where a call that mixes meta and real tensors lands: the devices
# are checked, as the real kernels check them.

def _same_device(first_name, first, **others):
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == first.device, lambda: f"{name} is on {t.device} but {first_name} is on "
                                                           f"{first.device}")

@torch.library.register_fake("adaround::soft_quantize")
def _(weight, v, scale, zero_point, quant_min, quant_max, axis=None):
    _same_device("weight", weight, v=v, scale=scale, zero_point=zero_point)
    torch._check(v.shape == weight.shape, lambda: "v must have the shape of weight")
    return torch.empty_like(weight)


@torch.library.register_fake("adaround::soft_quantize_backward")
def _(grad_output, weight, v, scale, zero_point, quant_min, quant_max, axis=None):
    _same_device("weight", weight, grad_output=grad_output, v=v, scale=scale, zero_point=zero_point)
    return torch.empty_like(v)


@torch.library.register_fake("adaround::round_regularizer")
def _(v, beta):
    return v.new_empty(())


@torch.library.register_fake("adaround::round_regularizer_backward")
def _(grad_output, v, beta):
    return torch.empty_like(v)


@torch.library.register_fake("adaround::hard_quantize")
def _(weight, scale, zero_point, quant_min, quant_max, axis=None, mode="nearest", v=None, noise=None):
    _same_device("weight", weight, scale=scale, zero_point=zero_point, v=v, noise=noise)
    codes = torch.empty(weight.shape, dtype=_C.code_dtype(quant_min, quant_max), device=weight.device)
    return codes, torch.empty_like(weight)


@torch.library.register_fake("adaround::init_v")
def _(weight, scale, axis=None):
    _same_device("weight", weight, scale=scale)
    return torch.empty(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)


# ---- autograd ------------------------------------------------------------------------------

def _soft_quantize_setup(ctx, inputs, output):
    weight, v, scale, zero_point, quant_min, quant_max, axis = inputs
    ctx.save_for_backward(weight, v, scale, zero_point)
    ctx.grid = (quant_min, quant_max, axis)


def _soft_quantize_backward(ctx, grad_output):
    weight, v, scale, zero_point = ctx.saved_tensors
    grad_v = None
    if ctx.needs_input_grad[1]:
        grad_v = _lib.soft_quantize_backward(grad_output, weight, v, scale, zero_point, *ctx.grid)
    # The weight and the grid are fixed during AdaRound: no gradient flows to them.
    return None, grad_v, None, None, None, None, None


torch.library.register_autograd("adaround::soft_quantize", _soft_quantize_backward,
                                setup_context=_soft_quantize_setup)


def _regularizer_setup(ctx, inputs, output):
    v, beta = inputs
    ctx.save_for_backward(v)
    ctx.beta = beta


def _regularizer_backward(ctx, grad_output):
    (v,) = ctx.saved_tensors
    return _lib.round_regularizer_backward(grad_output, v, ctx.beta), None


torch.library.register_autograd("adaround::round_regularizer", _regularizer_backward,
                                setup_context=_regularizer_setup)


@torch.library.register_fake("adaround::fake_quantize_activation")
def _(input, scale, zero_point, quant_min, quant_max, clamp_min=None, clamp_max=None, drop_probability=0.0,
      drop_seed=0):
    _same_device("input", input, scale=scale, zero_point=zero_point)
    return _activation_like(input)


@torch.library.register_fake("adaround::fake_quantize_activation_backward")
def _(grad_output, input, scale, zero_point, quant_min, quant_max, clamp_min=None, clamp_max=None,
      drop_probability=0.0, drop_seed=0, scale_grad=True):
    _same_device("input", input, grad_output=grad_output, scale=scale, zero_point=zero_point)
    return _activation_like(input), torch.empty_like(scale)


def _activation_like(input):
    """The activation ops' output layout: the input's strides when its elements fill their memory
    without gaps or overlaps in some dimension order (as at::Tensor::is_non_overlapping_and_dense),
    else contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(input.stride(), input.shape) if sz != 1):
        if stride != expected:
            return torch.empty(input.shape, dtype=input.dtype, device=input.device)
        expected *= size
    return torch.empty_like(input)


@torch.library.register_fake("adaround::channel_clip")
def _(input, upper, dim=1):
    _same_device("input", input, upper=upper)
    return _activation_like(input)


@torch.library.register_fake("adaround::channel_clip_backward")
def _(grad_output, input, upper, dim=1):
    _same_device("input", input, grad_output=grad_output, upper=upper)
    return _activation_like(input)


# The activation ops' autograd is in C++ (csrc/activation_autograd.cpp): block reconstruction calls
# them per layer and iteration on small activations, where a Python formula's overhead would rival the
# kernel. A _C built before them lacks it, and PyTorch's fallback would only warn while no gradient flows.
for _op in ("fake_quantize_activation", "channel_clip"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"adaround::{_op}", "Autograd"):
        raise ImportError(f"adaround_ext._C is older than its Python package ({_op} has no autograd kernel): "
                          "rebuild it (scripts/bootstrap.sh, or setup.py build_ext --inplace)")


@torch.library.register_fake("adaround::reconstruction_grad")
def _(pre_activation, target, activation, norm):
    _same_device("pre_activation", pre_activation, target=target)
    return torch.empty_like(pre_activation)


@torch.library.register_fake("adaround::adam_rounding_step_")
def _(v, exp_avg, exp_avg_sq, soft_weight, grad_soft_weight, grid_base, scale, zero_point,
      quant_min, quant_max, axis, reg_lambda, beta, lr, beta1, beta2, eps, step):
    _same_device("v", v, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, soft_weight=soft_weight,
                 grad_soft_weight=grad_soft_weight, grid_base=grid_base, scale=scale, zero_point=zero_point)
    return None


@torch.library.register_fake("adaround::adam_rounding_step_scheduled_")
def _(v, exp_avg, exp_avg_sq, soft_weight, grad_soft_weight, grid_base, scale, zero_point,
      quant_min, quant_max, axis, schedule, lr, beta1, beta2, eps):
    _same_device("v", v, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, soft_weight=soft_weight,
                 grad_soft_weight=grad_soft_weight, grid_base=grid_base, scale=scale, zero_point=zero_point,
                 schedule=schedule)
    return None
