"""Activation range methods (QuantConfig.activation_range) on a testbed checkpoint: the weights are
rounded once per setting (nearest and AdaRound, with activations in float during AdaRound, so that
the rounding does not depend on the method), then each method calibrates the activation quantizers
of a copy and the copy is evaluated.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_activation_ranges.py --arch resnet50 \
        --checkpoint runs/fashion_mnist_resnet50_1epoch_20k.pt --settings w8a8,w4a8 --iterations 1000 \
        --eval-images 2000
"""
import argparse
import copy
import time

import torch

from common import print_table

from adaround_ext import QuantConfig, quantize  # noqa: E402
from adaround_ext.activation_ranges import RANGE_METHODS  # noqa: E402
from adaround_ext.quantize import calibrate_activations  # noqa: E402
from adaround_testbed import testbed  # noqa: E402
from adaround_testbed.cli import SETTINGS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18", choices=testbed.ARCHS)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--settings", default="w8a8,w4a8")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--eval-images", type=int, default=10000)
    p.add_argument("--placement", default="inputs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = testbed.load_network(args.arch, args.checkpoint)
    calib, test = testbed.calibration_and_test(args.samples, args.eval_images)
    fp32 = testbed.evaluate(model, *test)
    rows = []
    for setting in args.settings.split(","):
        _, overrides = SETTINGS[setting]
        common = dict(overrides, iterations=args.iterations, num_samples=args.samples, device="cpu", progress=False,
                      activation_placement=args.placement, seed=args.seed, quantized_inputs=False)
        rounded = {}
        for rounding in ("nearest", "adaround"):
            start = time.perf_counter()
            rounded[rounding] = quantize(model, calib, QuantConfig(rounding=rounding, **common))
            print(f"{setting} {rounding}: {time.perf_counter() - start:.0f} s", flush=True)
        weights_only = {r: copy.deepcopy(q) for r, q in rounded.items()}
        for q in weights_only.values():  # the same rounding with float activations
            calibrate_activations_off_(q)
        rows.append((setting, "none (A32)", f"{fp32:.2f}",
                     *(f"{testbed.evaluate(q, *test):.2f}" for q in weights_only.values())))
        for method in RANGE_METHODS:
            accs = []
            for q in rounded.values():
                q = copy.deepcopy(q)
                calibrate_activations(q, calib, overrides["activation_bits"], "cpu", method=method)
                accs.append(f"{testbed.evaluate(q, *test):.2f}")
            rows.append((setting, method, f"{fp32:.2f}", *accs))
            print(rows[-1], flush=True)
    print(f"\n{args.arch}, {args.iterations} iterations/layer, {args.samples} calibration images, seed {args.seed}, "
          f"{len(test[1])} test images, activation quantizers on {args.placement}")
    print_table(("setting", "activation range", "FP32", "nearest", "AdaRound"), rows)


def calibrate_activations_off_(model):
    """Removes every activation quantizer (input quantizers; output quantizers become identities)."""
    from adaround_ext.modules import QuantizedLayer
    from adaround_ext.placement import output_quantizer_slots, set_output_quantizers

    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            m.input_quantizer = None
    slots = output_quantizer_slots(model)
    if slots:
        set_output_quantizers(model, {key: torch.nn.Identity() for key in slots})


if __name__ == "__main__":
    main()
