"""Fused rounding ops vs the same math composed from eager PyTorch ops, on the ResNet18 weight shapes
(4-bit per-channel). Two tables, each with the ratio and the fused kernels' memory bandwidth against
the device's copy bandwidth (a large tensor copy, the practical peak):
- autograd: soft-quantize forward + backward + regularizer value and gradient, through autograd;
- optimisation step: optimize_layer's fused adam_rounding_step_ (dL/dV, Adam, the new W~ in one pass)
  against autograd + torch.optim.Adam + recomputing W~.

    .venv/bin/python benchmarks/bench_ops.py [--device cuda] [--repeats 7]
"""
import argparse

import torch

from common import RESNET18_CONVS, median_time, print_table

import adaround_ext as ae  # noqa: E402
from adaround_testbed import reference as ref  # noqa: E402


def make_step(impl, w, scale, v, grad, beta):
    soft = ae.soft_quantize if impl == "fused" else (lambda *a: ref.soft_quantize(*a))
    reg = ae.round_regularizer if impl == "fused" else ref.regularizer

    def step():
        v.grad = None
        loss = (soft(w, v, scale, None, -8, 7, 0) * grad).sum() + 0.01 * reg(v, beta)
        loss.backward()

    return step


def make_optimizer_step(impl, w, scale, grad, beta):
    """One optimisation step of V from dL/dW~ = grad, ending with the new W~."""
    v = ae.init_v(w, scale, 0)
    if impl == "fused":
        exp_avg, exp_avg_sq = torch.zeros_like(v), torch.zeros_like(v)
        soft = ae.soft_quantize(w, v, scale, None, -8, 7, 0)
        base = torch.floor(w / scale.view(-1, 1, 1, 1))
        return lambda: torch.ops.adaround.adam_rounding_step_(v, exp_avg, exp_avg_sq, soft, grad, base, scale,
                                                              torch.zeros_like(scale), -8, 7, 0, 0.01, beta, 1e-3,
                                                              0.9, 0.999, 1e-8, 10)
    v.requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=1e-3)

    def step():
        optimizer.zero_grad()
        loss = (ref.soft_quantize(w, v, scale, None, -8, 7, 0) * grad).sum() + 0.01 * ref.regularizer(v, beta)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            return ref.soft_quantize(w, v, scale, None, -8, 7, 0)

    return step


def copy_bandwidth(device, repeats):
    """Bytes per second of a 256 MiB tensor copy (read + write)."""
    src = torch.empty(2**26, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = copy_bandwidth(args.device, args.repeats)
    # Bytes per weight the fused kernels must move. Autograd ops: forward reads W, V and writes W~;
    # backward reads g, W, V and writes dV; the regulariser reads V twice and writes dV once.
    # Step: reads V, both moments, dL/dW~ and the grid base; writes V, both moments and W~.
    tables = {"autograd ops": (make_step, 9), "optimisation step": (make_optimizer_step, 9)}
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"copy bandwidth {peak / 1e9:.1f} GB/s")
    for title, (make, words_per_weight) in tables.items():
        rows = []
        for name, shape, *_ in RESNET18_CONVS:
            w = torch.randn(shape, device=args.device) * 0.05
            scale = w.abs().amax(dim=(1, 2, 3)) / 7
            grad = torch.randn_like(w)
            if make is make_step:
                v = ae.init_v(w, scale, 0).requires_grad_(True)
                eager, fused = make("eager", w, scale, v, grad, 8.0), make("fused", w, scale, v, grad, 8.0)
            else:
                eager, fused = make("eager", w, scale, grad, 8.0), make("fused", w, scale, grad, 8.0)
            t_eager = median_time(eager, args.device, args.repeats)
            t_fused = median_time(fused, args.device, args.repeats)
            bandwidth = w.numel() * 4 * words_per_weight / t_fused
            rows.append((name, "x".join(map(str, shape)), f"{t_eager * 1e3:.3f}", f"{t_fused * 1e3:.3f}",
                         f"{t_eager / t_fused:.2f}x", f"{bandwidth / 1e9:.1f}", f"{bandwidth / peak:.0%}"))
        print(f"\n{title}")
        print_table(("layer", "weight", "eager ms", "fused ms", "speedup", "fused GB/s", "of copy"), rows)


if __name__ == "__main__":
    main()
