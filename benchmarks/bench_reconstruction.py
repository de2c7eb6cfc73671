"""Layer-wise AdaRound against block reconstruction (QuantConfig.reconstruction="block"), with and
without QDrop and learned activation steps, on the Fashion-MNIST testbed: for each setting the accuracy
of nearest rounding and of each reconstruction (mean and spread over seeds) and the time of each
reconstruction run over the layer-wise one's, measured in this run.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_reconstruction.py --arch resnet18 \
        --settings w4a4,w2a4 --iterations 1000 --seeds 0,1,2

The FP32 checkpoint is runs/fashion_mnist_<arch>.pt (the main job trains and saves it). Settings are the
main job's (adaround_testbed/cli.py); per-tensor settings get cross-layer equalization as the main job
gives them.
"""
import argparse
import statistics
import time

from common import add_testbed_arguments, mean_spread, print_table, testbed_model_and_data

from adaround_ext import QuantConfig, quantize  # noqa: E402
from adaround_testbed import testbed  # noqa: E402
from adaround_testbed.cli import SETTINGS  # noqa: E402

# column: the QuantConfig options of the reconstruction. The first three keep QuantConfig's default
# quantized_inputs (on at 4-bit activations, off at 8); the others set it.
RECONSTRUCTIONS = {
    "layer-wise": dict(reconstruction="layer"),
    "block": dict(reconstruction="block"),
    "block+QDrop+steps": dict(reconstruction="block", activation_drop=0.5, learn_activation_steps=True),
    # The parts of the last one alone, and each mode with quantized_inputs set (not in the default columns):
    "layer-wise+quantized-inputs": dict(reconstruction="layer", quantized_inputs=True),
    "block+quantized-inputs": dict(reconstruction="block", quantized_inputs=True),
    "layer-wise+float-inputs": dict(reconstruction="layer", quantized_inputs=False),
    "block+float-inputs": dict(reconstruction="block", quantized_inputs=False),
    "block+QDrop": dict(reconstruction="block", activation_drop=0.5),
    # Block mode with the activations a block computes quantized while it learns (the default before
    # inner_activations), and QDrop with learned steps with them float:
    "block+quantized-inner": dict(reconstruction="block", inner_activations="quantized"),
    "block+QDrop+steps+float-inner": dict(reconstruction="block", activation_drop=0.5, learn_activation_steps=True,
                                          inner_activations="float"),
    # Layer-wise without the loop's full-data (exact) mode, on minibatches as a block always is:
    "layer-wise+minibatch": dict(reconstruction="layer", mode="minibatch"),
}
DEFAULT_COLUMNS = ("layer-wise", "block", "block+QDrop+steps")


def main():
    p = argparse.ArgumentParser()
    add_testbed_arguments(p)
    p.add_argument("--settings", default="w4a4,w2a4")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help=f"of {', '.join(RECONSTRUCTIONS)}")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seeds", default="0")
    p.add_argument("--activation-bits", default="setting", help="2 to 8, or none (float activations); "
                   "default: the setting's")
    p.add_argument("--first-last-bits", type=int, default=None,
                   help="bit width of the first and last layer (BRECQ and QDrop keep them at 8)")
    p.add_argument("--asymmetric-weights", action="store_true",
                   help="weight grids with a zero point (QuantConfig(symmetric=False)), as BRECQ and QDrop use")
    args = p.parse_args()
    model, calib, test, fp32 = testbed_model_and_data(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    columns = args.columns.split(",")
    rows = []
    for setting in args.settings.split(","):
        description, overrides = SETTINGS[setting]
        if args.activation_bits != "setting":
            bits = None if args.activation_bits == "none" else int(args.activation_bits)
            overrides = dict(overrides, activation_bits=bits)
            description += f", activations {bits or 'float'}"
        if args.asymmetric_weights:
            overrides = dict(overrides, symmetric=False)
        common = dict(overrides, iterations=args.iterations, num_samples=args.samples, device="cpu", progress=False,
                      cross_layer_equalization=not overrides["per_channel"], first_layer_bits=args.first_last_bits,
                      last_layer_bits=args.first_last_bits)
        nearest = testbed.evaluate(quantize(model, calib, QuantConfig(rounding="nearest", **common)), *test)
        row, seconds = [setting, f"{fp32:.2f}", f"{nearest:.2f}"], {}
        for column in columns:
            accs, times = [], []
            for seed in seeds:
                start = time.perf_counter()
                q = quantize(model, calib, QuantConfig(seed=seed, **RECONSTRUCTIONS[column], **common))
                times.append(time.perf_counter() - start)
                accs.append(testbed.evaluate(q, *test))
                print(f"{description}, {column}, seed {seed}: {accs[-1]:.2f} ({times[-1]:.0f} s)", flush=True)
            seconds[column] = statistics.mean(times)
            row.append(mean_spread(accs))
        first = seconds[columns[0]]
        row.append(" / ".join(f"{seconds[c] / first:.2f}" for c in columns))
        rows.append(row)
    print(f"\n{args.arch}, {args.iterations} iterations per layer or block, {args.samples} calibration images, "
          f"seeds {args.seeds}, {len(test[1])} test images, first/last layer bits {args.first_last_bits or 'as set'}, "
          f"{'asymmetric' if args.asymmetric_weights else 'symmetric'} weight grids; "
          f"time: each column's mean over {columns[0]}'s")
    print_table(("setting", "FP32", "nearest", *columns, "time"), rows)


if __name__ == "__main__":
    main()
