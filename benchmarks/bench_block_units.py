"""Where block reconstruction's time goes: one quantize() layer-wise and one with
reconstruction="block", in one process, and per block the optimisation seconds of its layers
(each layer's `seconds` in `adaround_report`, summed per block) in each mode, with the ratio.
Also prints both per-layer reports (the layer-wise one names each layer's execution mode).

    PYTHONPATH=python .venv/bin/python benchmarks/bench_block_units.py --arch resnet18 --setting w4a4 \
        --iterations 2000

Run it alone: the ratios are what carries over to another machine.
"""
import argparse
import collections

from common import add_testbed_arguments, print_table, setting_config, testbed_model_and_data

from adaround_ext import quantize  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    add_testbed_arguments(p, eval_images=1000, eval_help="only for the FP32 line")
    p.add_argument("--setting", default="w4a4")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, calib, _, fp32 = testbed_model_and_data(args)
    reports = {}
    for mode in ("layer", "block"):
        config = setting_config(args.setting, args.iterations, args.samples, args.seed, reconstruction=mode)
        reports[mode] = quantize(model, calib, config).adaround_report
        print(reports[mode].table(), flush=True)
    block_of = {r.name: r.block or r.name for r in reports["block"].layers}
    seconds = collections.defaultdict(lambda: dict(layer=0.0, block=0.0))
    for mode, report in reports.items():
        for r in report.layers:
            seconds[block_of.get(r.name, r.name)][mode] += r.seconds
    rows = [(unit, f"{s['layer']:.1f}", f"{s['block']:.1f}", f"{s['block'] / s['layer']:.2f}" if s["layer"] else "-")
            for unit, s in seconds.items()]
    total = {mode: report.optimize_seconds for mode, report in reports.items()}
    rows.append(("total", f"{total['layer']:.1f}", f"{total['block']:.1f}", f"{total['block'] / total['layer']:.2f}"))
    print(f"\n{args.arch} {args.setting}, {args.iterations} iterations per layer or block, FP32 {fp32:.2f}")
    print_table(("unit", "layer-wise s", "block s", "block / layer-wise"), rows)


if __name__ == "__main__":
    main()
