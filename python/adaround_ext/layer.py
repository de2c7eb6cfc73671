"""Python wrapper of torch.ops.adaround.optimize_layer with a readable result."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import _C


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
    activation, mode, seed, log_every, allow_tf32, cuda_graph (the op's defaults, QuantConfig's, when omitted).
    progress: a description to show a tqdm bar over the iterations (None: no bar).
    """
    device = weight.device
    as_device = lambda t: None if t is None else t.detach().to(device)
    bar = _iteration_bar(progress, options.get("iterations", 10000)) if progress else contextlib.nullcontext()
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
