"""The kernel taps of a convolution that ever read the input, and the smaller convolution over only
those. On maps smaller than the kernel's reach (a 3x3 kernel on a 1x1 map reads only its centre; the
rest multiplies padding) the cropped convolution gives the same output, and autograd gives the dead
taps no gradient from the data, at a fraction of the products. Block reconstruction learns the live
taps only and rounds the dead ones to nearest, as the per-layer loop does with the columns of its
unfolded cache that never see data; the last blocks of small-image networks run on such maps.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple


def live_tap_range(size: int, kernel: int, stride: int, padding: int, dilation: int) -> Tuple[int, int]:
    """(first, last) tap along one spatial dimension that reads an input element (not padding) for
    some output position (the whole kernel where none does: every output reads padding only). Taps
    between them are kept even if dead (possible where the stride exceeds the map), so that the
    cropped kernel is a slice."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [tap for tap in range(kernel)
            if any(0 <= o * stride - padding + tap * dilation < size for o in range(outputs))]
    return (live[0], live[-1]) if live else (0, kernel - 1)


@functools.lru_cache(maxsize=None)
def cropped_window(input_size: Tuple[int, ...], kernel: Tuple[int, ...], stride: Tuple[int, ...],
                   padding: Tuple[int, ...], dilation: Tuple[int, ...]) -> Optional[Tuple[Tuple[slice, ...],
                                                                                           Tuple[int, ...]]]:
    """(the weight's index of the live taps, the cropped convolution's padding), or None where every
    tap is live or the cropped convolution would not give the same output positions."""
    index, new_padding, cropped = [slice(None), slice(None)], [], False
    for size, k, s, p, d in zip(input_size, kernel, stride, padding, dilation):
        first, last = live_tap_range(size, k, s, p, d)
        pad = p - first * d  # the same input element under output position 0's first live tap
        span = d * (last - first)
        if pad < 0 or (size + 2 * pad - span - 1) // s != (size + 2 * p - d * (k - 1) - 1) // s:
            return None
        cropped |= (first, last) != (0, k - 1)
        index.append(slice(first, last + 1))
        new_padding.append(pad)
    return (tuple(index), tuple(new_padding)) if cropped else None


def live_window(weight_shape: Sequence[int], input_shape: Sequence[int], geometry: dict):
    """For a non-transposed convolution with a weight of `weight_shape` over an input of `input_shape`
    (batched, channels first): (the weight's index of its live taps, the geometry of the convolution
    over only those), or None where every tap is live."""
    spatial = len(input_shape) - 2
    per_dim = lambda key: tuple(geometry[key]) * (spatial if len(geometry[key]) == 1 else 1)  # noqa: E731
    window = cropped_window(tuple(input_shape[2:]), tuple(weight_shape[2:]), per_dim("stride"), per_dim("padding"),
                            per_dim("dilation"))
    if window is None:
        return None
    index, padding = window
    return index, dict(geometry, padding=padding)
