"""optimize_layer vs the plain-PyTorch AdaRound loop (autograd + torch.optim.Adam) on the same
layer, cache, iterations and seed, for the ResNet18 conv shapes.

    .venv/bin/python benchmarks/bench_optimize_layer.py                  # Fashion-MNIST testbed sizes, CPU
    .venv/bin/python benchmarks/bench_optimize_layer.py --device cuda --imagenet   # GPU machine
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from common import RESNET18_CONVS, print_table, sync

import adaround_ext  # noqa: E402,F401
from adaround_testbed import reference as ref  # noqa: E402


def layer_case(shape, stride, size, samples, device):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5).to(device)
    b = (torch.randn(shape[0], generator=g) * 0.05).to(device)
    x = torch.relu(torch.randn(samples, shape[1], size, size, generator=g)).to(device)
    geometry = dict(stride=[stride, stride], padding=[shape[2] // 2] * 2, dilation=[1, 1], groups=1)
    targets = torch.relu(F.conv2d(x, w, b, **geometry))
    x_hat = x + 0.01 * torch.randn(x.shape, generator=g).to(device)
    scale = w.abs().amax(dim=(1, 2, 3)) / 7
    return w, b, scale, x_hat, targets, geometry


def winograd_columns(shape, stride, time_ours, t_ours, iterations):
    """it/s of optimize_layer with ADAROUND_WINOGRAD=0 (direct) and =2 (F(2x2, 3x3) where the default
    may take F(4x4, 3x3)), and the gain of the default over direct, for 3x3 stride-1 layers (the
    others never take the Winograd path; about 1.00x means this one did not)."""
    if shape[2:] != (3, 3) or stride != 1:
        return ("-", "-", "-")
    times = {}
    for setting in ("0", "2"):
        os.environ["ADAROUND_WINOGRAD"] = setting
        try:
            times[setting] = time_ours()
        finally:
            del os.environ["ADAROUND_WINOGRAD"]
    return (f"{iterations / times['0']:.1f}", f"{iterations / times['2']:.1f}", f"{times['0'] / t_ours:.2f}x")


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--samples", type=int, default=1024, help="cached samples per layer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--imagenet", action="store_true", help="ImageNet activation sizes (56x56 ... 7x7)")
    parser.add_argument("--layers", default="", help="comma-separated subset of layer names")
    args = parser.parse_args()
    rows = []
    for name, shape, stride, small, large in RESNET18_CONVS:
        if args.layers and name not in args.layers.split(","):
            continue
        size = large if args.imagenet else small
        samples = min(args.samples, 256) if args.imagenet else args.samples
        w, b, scale, x, t, geo = layer_case(shape, stride, size, samples, args.device)
        common = dict(iterations=args.iterations, batch_size=args.batch_size, lr=1e-3, reg_lambda=0.01,
                      warm_start=0.2, activation="relu", seed=0)
        t_plain, _ = timed(lambda: ref.adaround_loop(w, b, scale, None, -8, 7, 0, x, t, geo, record_losses=False,
                                                     **common), args.device)
        ours = lambda graph: torch.ops.adaround.optimize_layer(
            w, b, scale, None, -8, 7, 0, x, t, geo["stride"], geo["padding"], geo["dilation"], 1,
            mode="minibatch", log_every=100, cuda_graph=graph, **common)
        t_ours, out = timed(lambda: ours(False), args.device)
        row = (name, "x".join(map(str, shape)), f"{size}x{size}", f"{args.iterations / t_plain:.1f}",
               f"{args.iterations / t_ours:.1f}", f"{t_plain / t_ours:.2f}x", f"{out[4]:.4g}", f"{out[5]:.4g}")
        if args.device == "cpu":  # the same op with the Winograd path off, and with the small tile
            row += winograd_columns(shape, stride, lambda: timed(lambda: ours(False), args.device)[0], t_ours,
                                    args.iterations)
        else:  # CUDA graphs on: one captured iteration replayed
            t_graph, _ = timed(lambda: ours(True), args.device)
            row += (f"{args.iterations / t_graph:.1f}", f"{t_ours / t_graph:.2f}x")
        rows.append(row)
    print(f"device={args.device} threads={torch.get_num_threads()} iterations={args.iterations} "
          f"batch={args.batch_size} torch={torch.__version__}")
    print("(times include optimize_layer's final full-cache error evaluation)")
    header = ("layer", "weight", "input", "plain it/s", "ours it/s", "speedup", "nearest err", "ada err")
    if args.device == "cpu":
        header += ("no-Winograd it/s", "F(2x2) it/s", "Winograd gain")
    else:
        header += ("graph it/s", "graph vs eager")
    print_table(header, rows)


if __name__ == "__main__":
    main()
