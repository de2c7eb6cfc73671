"""The weight gradient of MobileNetV2's depthwise 3x3 convolutions on the testbed's map sizes: oneDNN's
(aten.convolution_backward) against the direct sum (_C.depthwise_weight_grad), batch 32, NCHW and
channels-last inputs. The ratio decides kDirectDepthwiseMaxPositions (csrc/cpu/depthwise_grad.h).

    PYTHONPATH=python .venv/bin/python benchmarks/bench_depthwise_grad.py
"""
import torch
import torch.nn.functional as F

from common import median_time, print_table

from adaround_ext import _C  # noqa: E402

# (channels, input side, stride): MobileNetV2's depthwise layers at 32x32 inputs, from the last blocks back
SHAPES = [(960, 1, 1), (576, 2, 2), (576, 2, 1), (384, 2, 1), (192, 4, 2), (192, 4, 1), (144, 8, 2), (144, 8, 1),
          (96, 16, 2), (32, 16, 1)]


def main():
    rows = []
    for channels, side, stride in SHAPES:
        kernel, padding = (1, 0) if side == 1 else (3, 1)  # a 1x1 map's kernel is cropped to its centre tap
        for layout in ("nchw", "nhwc"):
            x = torch.randn(32, channels, side, side)
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            weight = torch.randn(channels, 1, kernel, kernel)
            grad = torch.randn_like(F.conv2d(x, weight, None, stride, padding, 1, channels))
            geometry = ([stride] * 2, [padding] * 2, [1, 1])

            def library():
                torch.ops.aten.convolution_backward(grad, x, weight, None, *geometry, False, [0, 0], channels,
                                                    [False, True, False])

            def direct():
                _C.depthwise_weight_grad(grad, x, [kernel] * 2, *geometry)

            lib, own = (median_time(lambda f=f: [f() for _ in range(20)], "cpu") / 20 for f in (library, direct))
            positions = grad.shape[2] * grad.shape[3]
            rows.append((f"{channels}x{side}x{side} s{stride}", layout, positions, f"{lib * 1e3:.3f}",
                         f"{own * 1e3:.3f}", f"{lib / own:.2f}",
                         "direct" if _C.direct_depthwise_grad_applies(grad, x, channels) else "library"))
    print_table(("layer input", "layout", "positions", "library ms", "direct ms", "library/direct", "chosen"), rows)


if __name__ == "__main__":
    main()
