"""Cross-layer equalization before AdaRound on the Fashion-MNIST testbed: for each setting, nearest and
AdaRound accuracy without and with CLE (QuantConfig.cross_layer_equalization), mean and spread over
seeds, and the time of each AdaRound run.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_equalization.py --arch mobilenet_v2 \
        --settings w4-pt,w4a8-paper --iterations 1000 --seeds 0,1,2

The FP32 checkpoint is runs/fashion_mnist_<arch>.pt (the main job trains and saves it:
adaround-quantize-resnet --arch <arch>). Settings are the main job's (adaround_testbed/cli.py).
"""
import argparse
import time

from common import add_testbed_arguments, mean_spread, print_table, testbed_model_and_data

from adaround_ext import QuantConfig, quantize  # noqa: E402
from adaround_testbed import testbed  # noqa: E402
from adaround_testbed.cli import SETTINGS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    add_testbed_arguments(p, arch="mobilenet_v2")
    p.add_argument("--settings", default="w4-pt,w4a8-paper")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seeds", default="0")
    p.add_argument("--plain-seeds", default=None, help="seeds of the runs without CLE (default --seeds)")
    args = p.parse_args()
    model, calib, test, fp32 = testbed_model_and_data(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    plain_seeds = [int(s) for s in (args.plain_seeds or args.seeds).split(",")]
    rows = []
    for setting in args.settings.split(","):
        description, overrides = SETTINGS[setting]
        row = [setting, f"{fp32:.2f}"]
        times = []
        for cle in (False, True):
            common = dict(overrides, iterations=args.iterations, num_samples=args.samples, device="cpu",
                          progress=False, cross_layer_equalization=cle)
            row.append(f"{testbed.evaluate(quantize(model, calib, QuantConfig(rounding='nearest', **common)), *test):.2f}")
            accs = []
            for seed in seeds if cle else plain_seeds:
                start = time.perf_counter()
                q = quantize(model, calib, QuantConfig(rounding="adaround", seed=seed, **common))
                times.append(time.perf_counter() - start)
                accs.append(testbed.evaluate(q, *test))
                print(f"{description}{', CLE' if cle else ''}, seed {seed}: AdaRound {accs[-1]:.2f}", flush=True)
            row.append(mean_spread(accs))
        row.append(f"{times[len(plain_seeds)] / times[0]:.2f}")  # CLE's AdaRound time over the plain one (first seed)
        rows.append(row)
    print(f"\n{args.arch}, {args.iterations} iterations/layer, {args.samples} calibration images, seeds {args.seeds} "
          f"(without CLE {args.plain_seeds or args.seeds}), "
          f"{len(test[1])} test images")
    print_table(("setting", "FP32", "nearest", "AdaRound", "CLE+nearest", "CLE+AdaRound", "time CLE/plain"), rows)


if __name__ == "__main__":
    main()
