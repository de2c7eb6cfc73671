"""Block reconstruction's activation quantizer, forward and backward, on MobileNetV2's activation shapes
(testbed inputs 32x32, batch 32): PyTorch's own composition (relu6, then torch's fake quantization,
learnable for learned steps, torch.where over a random mask for QDrop) against the fused
torch.ops.adaround.fake_quantize_activation (clamp, grid, QDrop's draws and both gradients in one pass
each way).

    PYTHONPATH=python .venv/bin/python benchmarks/bench_activation_quant.py [--device cuda]
"""
import argparse

import torch
import torch.nn.functional as F

from common import median_time, print_table

from adaround_ext._ops import fake_quantize_activation  # noqa: E402

# (channels, side): expanded activations of MobileNetV2's blocks at 32x32 inputs, from the last blocks back
SHAPES = [(960, 1), (576, 2), (384, 2), (192, 4), (144, 8), (96, 16)]
QMIN, QMAX, ZERO_POINT = 0, 15, 0  # A4 after a ReLU6: an unsigned grid from 0
VARIANTS = ("fixed step", "learned step", "learned step + QDrop")


def torch_quantizer(variant, scale, zero_point, generator):
    def run(x):
        y = F.relu6(x)
        if variant == "fixed step":
            return torch.fake_quantize_per_tensor_affine(y, scale.detach()[0], zero_point.int()[0], QMIN, QMAX)
        quantized = torch._fake_quantize_learnable_per_tensor_affine(y, scale, zero_point, QMIN, QMAX, 1.0)
        if variant == "learned step":
            return quantized
        return torch.where(torch.rand(y.shape, generator=generator, device=y.device) < 0.5, y, quantized)
    return run


def fused_quantizer(variant, scale, zero_point, generator):
    def run(x):
        drop, seed = 0.0, 0
        if variant == "learned step + QDrop":  # as ReconstructionQuantizer draws its seeds
            drop, seed = 0.5, int(torch.randint(2**62, (), generator=generator))
        step = scale.detach() if variant == "fixed step" else scale
        return fake_quantize_activation(x, step, zero_point, QMIN, QMAX, 0.0, 6.0, drop, seed)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    device = args.device
    rows = []
    for channels, side in SHAPES:
        x = (torch.randn(args.batch, channels, side, side, device=device) * 3).requires_grad_()
        grad = torch.randn_like(x)
        for variant in VARIANTS:
            times = []
            for make in (torch_quantizer, fused_quantizer):
                scale = torch.tensor([6.0 / QMAX], device=device, requires_grad=variant != "fixed step")
                zero_point = torch.tensor([float(ZERO_POINT)], device=device)
                generator = torch.Generator(device=device if make is torch_quantizer else "cpu").manual_seed(0)
                quantize = make(variant, scale, zero_point, generator)
                inputs = (x, scale) if scale.requires_grad else (x,)
                step = lambda: torch.autograd.grad(quantize(x), inputs, grad)  # noqa: E731
                times.append(median_time(lambda: [step() for _ in range(20)], device) / 20)
            rows.append((f"{args.batch}x{channels}x{side}x{side}", variant, f"{times[0] * 1e6:.0f}",
                         f"{times[1] * 1e6:.0f}", f"{times[0] / times[1]:.2f}"))
    print_table(("activation", "quantizer", "torch us", "fused us", "torch/fused"), rows)


if __name__ == "__main__":
    main()
