"""Two of block reconstruction's CPU forms against PyTorch's, forward + backward of a batch of 32 on
NHWC data, as a block runs them:

- a dense convolution of the testbed's resnet18 as the library's convolution (oneDNN) against the
  matrix product over its unfolded input (SoftLayer), with and without the input gradient (a block's
  first convolution reads the cached input, the others need it). The ratio decides
  UNFOLDED_MAX_POSITIONS (python/adaround_ext/blocks.py);
- a ChannelClip (a ReLU6 after cross-layer equalization) on mobilenet_v2's activation shapes through
  autograd against ReconstructionClip (torch.ops.adaround.channel_clip).

    PYTHONPATH=python .venv/bin/python benchmarks/bench_block_small_convs.py
"""
import torch
import torch.nn.functional as F

from common import RESNET18_CONVS, median_time, print_table

from adaround_ext import blocks  # noqa: E402
from adaround_ext.modules import ChannelClip  # noqa: E402

# (channels, side): mobilenet_v2's expanded activations at 32x32 inputs
CLIP_SHAPES = [(96, 16), (144, 8), (192, 4), (384, 2), (960, 1)]


def conv_rows():
    # a 3x3 kernel on layer4's 2x2 input with stride 2 is cropped to its 2x2 live taps (live_taps.py)
    shapes = [(name, shape, stride, side, (1, 1)) for name, shape, stride, side, _ in RESNET18_CONVS[1:]]
    shapes.append(("layer4.0.conv1 live taps", (512, 256, 2, 2), 2, 2, (0, 0)))
    rows = []
    for name, shape, stride, side, padding in shapes:
        if shape[2] == 3 and side == 1:
            continue  # cropped to its centre tap: a 1x1 convolution, already a matrix product
        padding = padding if shape[2] == 3 else (0, 0)
        geometry = dict(stride=(stride, stride), padding=padding, dilation=(1, 1), groups=1)
        for input_grad in (False, True):
            x = torch.randn(32, shape[1], side, side).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(input_grad)
            weight = torch.randn(shape, requires_grad=True)
            layer = blocks.SoftLayer("conv2d", None, geometry)
            layer.weight = weight
            wanted = [weight, x] if input_grad else [weight]

            def run():
                out = layer(x)
                torch.autograd.grad(out, wanted, torch.ones_like(out))

            times = {}
            chosen = blocks._runs_as_matrix_product(x, weight, geometry)
            limit = blocks.UNFOLDED_MAX_POSITIONS
            for form, bound in (("library", 0), ("matrix product", 10**9)):
                blocks.UNFOLDED_MAX_POSITIONS = bound
                times[form] = median_time(lambda: [run() for _ in range(10)], "cpu") / 10
            blocks.UNFOLDED_MAX_POSITIONS = limit
            positions = layer(x).shape[2] * layer(x).shape[3]
            rows.append((name, positions, "yes" if input_grad else "no", f"{times['library'] * 1e3:.2f}",
                         f"{times['matrix product'] * 1e3:.2f}", f"{times['library'] / times['matrix product']:.2f}",
                         "matrix product" if chosen else "library"))
    print_table(("layer", "positions", "input grad", "library ms", "matrix product ms", "library/product", "chosen"),
                rows)


def clip_rows():
    rows = []
    for channels, side in CLIP_SHAPES:
        clip = ChannelClip(torch.rand(channels) * 6 + 1)
        x = (torch.randn(32, channels, side, side) * 4).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad = torch.randn_like(x)
        times = {}
        for form, fn in (("autograd", clip), ("op", blocks.ReconstructionClip(clip))):
            times[form] = median_time(lambda: [torch.autograd.grad(fn(x), x, grad) for _ in range(10)], "cpu") / 10
        rows.append((f"{channels}x{side}x{side}", f"{times['autograd'] * 1e3:.3f}", f"{times['op'] * 1e3:.3f}",
                     f"{times['autograd'] / times['op']:.2f}"))
    print_table(("activation", "autograd ms", "channel_clip op ms", "autograd/op"), rows)


def main():
    conv_rows()
    print()
    clip_rows()


if __name__ == "__main__":
    main()
