"""Fused rounding ops vs the same math composed from eager PyTorch ops.

One step = soft-quantize forward + backward + regularizer value and gradient, through autograd in
both cases, 4-bit per-channel, on the ResNet18 weight shapes. Prints time per step and the ratio.

    .venv/bin/python benchmarks/bench_ops.py [--device cuda] [--repeats 7]
"""
import argparse

import torch

from common import RESNET18_CONVS, median_time, print_table

import adaround_ext as ae  # noqa: E402
import reference as ref  # noqa: E402


def make_step(impl, w, scale, v, grad, beta):
    soft = ae.soft_quantize if impl == "fused" else (lambda *a: ref.soft_quantize(*a))
    reg = ae.round_regularizer if impl == "fused" else ref.regularizer

    def step():
        v.grad = None
        loss = (soft(w, v, scale, None, -8, 7, 0) * grad).sum() + 0.01 * reg(v, beta)
        loss.backward()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, shape, *_ in RESNET18_CONVS:
        w = torch.randn(shape, device=args.device) * 0.05
        scale = w.abs().amax(dim=(1, 2, 3)) / 7
        v = ae.init_v(w, scale, 0).requires_grad_(True)
        grad = torch.randn_like(w)
        t_eager = median_time(make_step("eager", w, scale, v, grad, 8.0), args.device, args.repeats)
        t_fused = median_time(make_step("fused", w, scale, v, grad, 8.0), args.device, args.repeats)
        numel = w.numel()
        # Bytes the fused ops must move: fwd reads W,V writes W~; bwd reads g,W,V writes dV; reg reads V
        # twice, writes dV once.
        gbps = numel * 4 * 9 / t_fused / 1e9
        rows.append((name, "x".join(map(str, shape)), f"{t_eager * 1e3:.3f}", f"{t_fused * 1e3:.3f}",
                     f"{t_eager / t_fused:.2f}x", f"{gbps:.1f}"))
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print_table(("layer", "weight", "eager ms", "fused ms", "speedup", "fused GB/s"), rows)


if __name__ == "__main__":
    main()
