"""The least time any implementation of the paper's loop can take on this machine for the whole
ResNet18 W4A8 run: per layer, the GEMMs (or convolutions) that every iteration must do, timed at the
layer's real shapes, times the iterations. Nothing else is counted: no Adam step, no minibatch
gathers, no caching, no evaluation.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_time_floor.py [--iterations 10000] [--target 300]

Each layer is timed the way optimize_layer runs it (the default settings, batch 32, 32x32 inputs):
- exact mode (identity loss, where cheaper): one [out, K] x [K, K] product per iteration;
- 3x3 stride-1 convolutions with 16+ input channels and 16+ even-sized output positions: Winograd
  F(2x2, 3x3), 16 GEMMs for the output and 16 for the weight gradient (the weight and output
  transforms, linear passes over memory, are not counted);
- small maps (<= 16 output positions): two GEMMs over the unfolded cache, live columns only;
- larger maps: oneDNN's convolution and its weight gradient.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import median_time, print_table

from adaround_ext import _C  # noqa: E402
from adaround_ext.folding import fold_batchnorm  # noqa: E402
from adaround_ext.quantize import execution_order, following_activations  # noqa: E402
from adaround_testbed.testbed import network  # noqa: E402

GEMM_MAX_POSITIONS = 16  # kGemmMaxPositions in csrc/loop/choose_path.cpp


def median_ms(fn, repeats=15):
    return median_time(fn, "cpu", repeats=repeats, warmup=3) * 1e3


def layer_inputs(model, example):
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes[name] = args[0].shape  # returns None: the input is left as it is
        return hook
    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    return shapes


def live_columns(conv, in_shape):
    """Columns of the [out, K] weight that see an input position (the rest only ever see padding)."""
    ones = torch.ones(1, *in_shape[1:])
    cols = F.unfold(ones, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [1, K, L]
    return int(cols[0].ne(0).any(1).sum())


def exact_is_cheaper(out, k, positions, batch, iterations, samples):
    # choose_exact in csrc/loop/choose_path.cpp
    minibatch = 2.0 * batch * positions * out * k * iterations
    exact = out * k * k * iterations + samples * positions * k * k
    return exact < minibatch


def winograd_tile(module, out_size):
    """The output tile side choose_path gives the layer (0: no Winograd)."""
    if not (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1):
        return 0
    return _C.winograd_tile(module.in_channels, *out_size)


def iteration_work(module, in_shape, activation, batch, iterations, samples):
    """(path, multiply-adds, timed function) of one iteration's products."""
    if isinstance(module, nn.Linear):
        out, k, positions, out_size = module.out_features, module.in_features, 1, torch.Size([1])
    else:
        out, k = module.out_channels, module.weight[0].numel()
        out_size = module(torch.zeros(1, *in_shape[1:])).shape[-2:]
        positions = out_size.numel()
    if activation == "none" and exact_is_cheaper(out, k, positions, batch, iterations, samples):
        gram, w = torch.randn(k, k), torch.randn(out, k)
        return "exact (W G)", out * k * k, lambda: w.mm(gram)
    tile = winograd_tile(module, out_size)
    if tile:
        rows, cin, points = batch * positions // tile**2, module.in_channels, (tile + 2) ** 2
        tiles, u, g = torch.randn(points, rows, cin), torch.randn(points, cin, out), torch.randn(points, rows, out)
        return (f"Winograd F({tile}x{tile},3x3)", 2 * points * rows * cin * out,
                lambda: (torch.bmm(tiles, u), torch.bmm(tiles.transpose(1, 2), g)))  # as csrc/cpu/winograd.cpp
    if isinstance(module, nn.Linear) or positions <= GEMM_MAX_POSITIONS:
        live = k if isinstance(module, nn.Linear) else live_columns(module, in_shape)
        rows = batch * positions
        x, w, g = torch.randn(rows, live), torch.randn(out, live), torch.randn(rows, out)
        return f"GEMM ({live}/{k} columns)", 2 * rows * out * live, lambda: (x.mm(w.t()), g.t().mm(x))
    x = torch.randn(batch, *in_shape[1:])
    w = module.weight.detach().clone()
    geo = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    grad_out = torch.randn_like(F.conv2d(x, w, **geo))

    def conv():
        F.conv2d(x, w, **geo)
        torch.ops.aten.convolution_backward(grad_out, x, w, None, list(module.stride), list(module.padding),
                                            list(module.dilation), False, [0, 0], module.groups,
                                            [False, True, False])
    return "conv (oneDNN)", 2 * batch * positions * out * k, conv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--target", type=float, default=300.0, help="the whole run's time target, seconds")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = fold_batchnorm(network("resnet18", num_classes=10).eval())  # as quantize() does
    example = torch.zeros(1, 3, 32, 32)
    shapes = layer_inputs(model, example)
    activations = following_activations(model)
    modules = dict(model.named_modules())
    big = torch.randn(2048, 2048)
    peak_ms = median_ms(lambda: big.mm(big), repeats=7)
    peak_gflops = 2 * 2048 ** 3 / peak_ms / 1e6
    rows, total_s = [], 0.0
    for name in execution_order(model, example):
        module = modules[name]
        path, macs, fn = iteration_work(module, shapes[name], activations.get(name, "none"),
                                        args.batch_size, args.iterations, args.samples)
        ms = median_ms(fn)
        seconds = ms * args.iterations / 1e3
        total_s += seconds
        rows.append((name, "x".join(map(str, module.weight.shape)), activations.get(name, "none"), path,
                     f"{ms:.3f}", f"{2 * macs / ms / 1e6:.0f}", f"{seconds:.1f}"))
    print(f"threads={torch.get_num_threads()} iterations={args.iterations} batch={args.batch_size} "
          f"torch={torch.__version__}; sgemm 2048^3: {peak_gflops:.0f} GFLOP/s")
    print_table(("layer", "weight", "loss act", "path", "ms/it", "GFLOP/s", f"s per {args.iterations} it"), rows)
    print(f"products alone: {total_s:.0f} s for the whole model = {total_s / args.target:.2f}x the "
          f"{args.target:.0f} s target (step, gathers, caching and evaluation not counted)")


if __name__ == "__main__":
    main()
