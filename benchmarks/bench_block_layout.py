"""Block reconstruction on the CPU with NHWC block data (the library's rule, blocks.runs_channels_last)
against the same run kept NCHW: whole quantize() runs, alternating in one process so that both see the
same machine state, with the accuracy of each (the codes may differ by float summation order only).

    PYTHONPATH=python .venv/bin/python benchmarks/bench_block_layout.py --arch resnet18 --setting w2a4 \
        --iterations 1000 --repeats 2

Run it alone: the ratio is all it reports that carries over to another machine.
"""
import argparse
import statistics
import time

from common import add_testbed_arguments, print_table, setting_config, testbed_model_and_data

from adaround_ext import blocks, caching, quantize  # noqa: E402
from adaround_testbed import testbed  # noqa: E402


def never_channels_last(nodes, device):
    return False


def main():
    p = argparse.ArgumentParser()
    add_testbed_arguments(p)
    p.add_argument("--setting", default="w2a4")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, calib, test, fp32 = testbed_model_and_data(args)
    config = setting_config(args.setting, args.iterations, args.samples, args.seed, reconstruction="block")
    # Both modules bind the rule by name (caching writes the caches, blocks runs the block); swap both.
    layouts = {"NHWC (rule)": blocks.runs_channels_last, "NCHW": never_channels_last}
    times, accs = {name: [] for name in layouts}, {}
    for _ in range(args.repeats):
        for name, rule in layouts.items():
            blocks.runs_channels_last = caching.runs_channels_last = rule
            start = time.perf_counter()
            q = quantize(model, calib, config)
            times[name].append(time.perf_counter() - start)
            accs[name] = testbed.evaluate(q, *test)
            print(f"{name}: {times[name][-1]:.1f} s, accuracy {accs[name]:.2f}", flush=True)
    nchw = statistics.mean(times["NCHW"])
    print(f"\n{args.arch} {args.setting}, {args.iterations} iterations per block, FP32 {fp32:.2f}")
    print_table(("layout", "accuracy", "time (mean s)", "over NCHW"),
                [(name, f"{accs[name]:.2f}", f"{statistics.mean(times[name]):.1f}",
                  f"{statistics.mean(times[name]) / nchw:.2f}") for name in layouts])


if __name__ == "__main__":
    main()
