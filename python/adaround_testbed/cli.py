"""The main job: quantize a ResNet (or MobileNetV2) and print FP32 / nearest / AdaRound accuracy.

Default: resnet18 on Debian's Fashion-MNIST (trained first when no checkpoint exists), W4A8 in the
paper's setting (per-tensor, weight-MSE grid) and per-channel. ImageNet: --data DIR --weights FILE.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

from adaround_ext.checkpoint import config_tag
from adaround_ext.config import (ACTIVATION_PLACEMENTS, ACTIVATION_RANGES, INNER_ACTIVATIONS, RECONSTRUCTIONS,
                                 QuantConfig)
from adaround_ext.encodings import export_aimet
from adaround_ext.onnx_export import export_onnx
from adaround_ext.plots import save_report_plot
from adaround_ext.quantize import quantize
from adaround_ext.serialization import save_quantized

from . import testbed

# name: (description, QuantConfig overrides)
SETTINGS = {
    "w8a8": ("W8A8 per-channel, weight-MSE grid", dict(weight_bits=8, activation_bits=8, per_channel=True,
                                                       scale_method="mse")),
    "w4a8": ("W4A8 per-channel, weight-MSE grid", dict(weight_bits=4, activation_bits=8, per_channel=True,
                                                       scale_method="mse")),
    "w4a4": ("W4A4 per-channel, weight-MSE grid", dict(weight_bits=4, activation_bits=4, per_channel=True,
                                                       scale_method="mse")),
    "w2a4": ("W2A4 per-channel, weight-MSE grid", dict(weight_bits=2, activation_bits=4, per_channel=True,
                                                       scale_method="mse")),
    "w4a8-paper": ("W4A8 per-tensor, weight-MSE grid (paper)", dict(weight_bits=4, activation_bits=8,
                                                                    per_channel=False, scale_method="mse")),
    "w4-pt": ("W4A32 per-tensor, weight-MSE grid", dict(weight_bits=4, activation_bits=None, per_channel=False,
                                                       scale_method="mse")),
    "w4-pc": ("W4A32 per-channel, min-max grid", dict(weight_bits=4, activation_bits=None, per_channel=True,
                                                     scale_method="minmax")),
    "w3-pt": ("W3A32 per-tensor, min-max grid", dict(weight_bits=3, activation_bits=None, per_channel=False,
                                                    scale_method="minmax")),
    "w2-pc": ("W2A32 per-channel, min-max grid", dict(weight_bits=2, activation_bits=None, per_channel=True,
                                                     scale_method="minmax")),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="adaround-quantize-resnet", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=testbed.ARCHS)
    p.add_argument("--settings", default="w4a8-paper,w4a8", help=f"comma-separated of {', '.join(SETTINGS)}")
    p.add_argument("--iterations", type=int, default=QuantConfig.iterations)
    p.add_argument("--samples", type=int, default=QuantConfig.num_samples, help="calibration images")
    p.add_argument("--batch-size", type=int, default=QuantConfig.batch_size)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the table gives mean and spread")
    p.add_argument("--first-last-bits", type=int, default=None, help="bit width of the first and last layer")
    p.add_argument("--asymmetric-weights", action="store_true",
                   help="weight grids with a zero point (unsigned codes) instead of the settings' symmetric ones")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs", help="where checkpoints, quantized models and reports go")
    p.add_argument("--model-checkpoint", default=None, help="Fashion-MNIST FP32 checkpoint (trained when missing)")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--data", default=None, help="ImageNet val folder (ImageFolder layout); default Fashion-MNIST")
    p.add_argument("--weights", default=None, help="torchvision pretrained weights file, with --data")
    p.add_argument("--calib-data", default=None,
                   help="folder (ImageFolder layout) to draw the calibration images from, e.g. ImageNet train; "
                        "default --data")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes for --data")
    p.add_argument("--eval-images", type=int, default=None,
                   help="evaluate on N test images (Fashion-MNIST: the first N; --data: a fixed random spread)")
    p.add_argument("--quantized-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="each layer learns its rounding against its quantized inputs; --no-quantized-inputs: "
                        "activations stay in float during AdaRound and are calibrated afterwards (AIMET's way); "
                        "default: quantized at activation bits <= 4")
    p.add_argument("--activation-range", default=QuantConfig.activation_range, choices=ACTIVATION_RANGES,
                   help="how activation ranges are calibrated: minmax, mse (least quantization error) or percentile")
    p.add_argument("--activation-placement", default=QuantConfig.activation_placement, choices=ACTIVATION_PLACEMENTS,
                   help="activation quantizers on each quantized layer's input, or on op outputs and the model "
                        "input (as AIMET's default configuration and integer runtimes place them)")
    p.add_argument("--activation-percentile", type=float, default=QuantConfig.activation_percentile,
                   help="with --activation-range percentile: the percentile kept at each end")
    p.add_argument("--cross-layer-equalization", default="auto", choices=["auto", "on", "off"],
                   help="equalize the model before quantizing it (adaround_ext.equalize); auto: on for the "
                        "per-tensor settings")
    p.add_argument("--reconstruction", default=QuantConfig.reconstruction, choices=RECONSTRUCTIONS,
                   help="what AdaRound reconstructs: each layer's output (the paper) or each residual block's "
                        "output, its layers' rounding learned jointly (BRECQ)")
    p.add_argument("--activation-bits", default="setting",
                   help="activation bit width for every setting (2 to 8, or 'none' for float activations); "
                        "default: the setting's")
    p.add_argument("--activation-drop", type=float, default=QuantConfig.activation_drop,
                   help="with --reconstruction block: QDrop, the probability that an activation element stays "
                        "in float during reconstruction")
    p.add_argument("--learn-activation-steps", action="store_true",
                   help="with --reconstruction block: learn the activation step sizes with the rounding (LSQ)")
    p.add_argument("--inner-activations", default=QuantConfig.inner_activations, choices=INNER_ACTIVATIONS,
                   help="with --reconstruction block and activations in the reconstruction: the activations a "
                        "block computes stay float or are quantized while its rounding is learned; auto: "
                        "quantized with QDrop or learned steps, else float")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: replay each iteration from a CUDA graph")
    args = p.parse_args(argv)
    if args.activation_bits != "setting":
        text = args.activation_bits
        args.activation_bits = None if text.lower() == "none" else (int(text) if text.isdigit() else -1)
        if args.activation_bits is not None and not 2 <= args.activation_bits <= 8:
            p.error(f"--activation-bits must be 2 to 8 or 'none', got {text!r}")
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    for setting in args.settings.split(","):  # option combinations QuantConfig refuses, before any work
        try:
            QuantConfig(**_setting_options(args, setting)[1], progress=False)
        except (ValueError, TypeError) as exc:
            p.error(f"setting {setting}: {exc}")
    return args


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _equalize(choice: str, overrides: dict) -> bool:
    """Cross-layer equalization for a setting: per-tensor grids need it on depthwise models (MobileNetV2)."""
    return choice == "on" or (choice == "auto" and not overrides["per_channel"])


def _setting_options(args, setting: str):
    """(the table's label, the QuantConfig options) of one setting under the command line's flags."""
    description, overrides = SETTINGS[setting]
    if args.activation_bits != "setting":
        overrides = dict(overrides, activation_bits=args.activation_bits)
        description += f", activations {args.activation_bits or 'float'}"
    options = dict(overrides, iterations=args.iterations, num_samples=args.samples, batch_size=args.batch_size,
                   first_layer_bits=args.first_last_bits, last_layer_bits=args.first_last_bits,
                   cuda_graph=args.cuda_graph, quantized_inputs=args.quantized_inputs,
                   activation_range=args.activation_range, activation_percentile=args.activation_percentile,
                   activation_placement=args.activation_placement,
                   cross_layer_equalization=_equalize(args.cross_layer_equalization, overrides),
                   reconstruction=args.reconstruction, activation_drop=args.activation_drop,
                   learn_activation_steps=args.learn_activation_steps, inner_activations=args.inner_activations)
    if args.asymmetric_weights:
        options["symmetric"] = False
        description += ", asymmetric weights"
    if options["cross_layer_equalization"]:
        description += ", CLE"
    return description + _reconstruction_label(args), options


def _reconstruction_label(args) -> str:
    """What the table's setting label adds for block reconstruction and its activation options."""
    if args.reconstruction == "layer":
        return ""
    label = ", blocks"
    if args.activation_drop > 0:
        label += f", QDrop {args.activation_drop:g}"
    if args.learn_activation_steps:
        label += ", learned steps"
    if args.inner_activations != "auto":
        label += f", {args.inner_activations} inside"
    return label


def load_fashion_model(args, log):
    path = args.model_checkpoint or os.path.join(args.out, f"fashion_mnist_{args.arch}.pt")
    model = testbed.network(args.arch, num_classes=10)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"FP32 model: {path}")
    else:
        log(f"training {args.arch} on Fashion-MNIST for {args.train_epochs} epochs (no checkpoint at {path})")
        images, labels = testbed.fashion_mnist("train")
        testbed.train(model.to(_device(args)), images, labels, epochs=args.train_epochs, log=log)
        model.cpu()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(model.state_dict(), path)
        log(f"saved {path}")
    return model.eval()


def load_imagenet_model(args, log):
    if not args.weights or not os.path.exists(args.weights):
        raise SystemExit(f"--data needs --weights pointing at a torchvision {args.arch} checkpoint found locally")
    for flag, folder in (("--data", args.data), ("--calib-data", args.calib_data)):
        if folder is not None and not os.path.isdir(folder):
            raise SystemExit(f"{flag} {folder!r} is not a directory (ImageFolder layout: one folder per class)")
    model = testbed.network(args.arch, num_classes=1000)
    try:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    except RuntimeError as exc:
        raise SystemExit(f"--weights {args.weights!r} does not fit torchvision {args.arch}: {exc}") from exc
    log(f"FP32 model: {args.weights}")
    return model.eval()


def write_artifacts(q, stem: str, example_input, title: str, log) -> None:
    """Native checkpoint, the AIMET export (encodings, quantsim config, rounded weights), ONNX QDQ model
    and the report PNG, side by side."""
    save_quantized(q, stem + ".pt")
    save_report_plot(q.adaround_report, stem + "_report.png", title=title)
    written = [stem + ".pt", stem + "_report.png"]
    try:
        written += export_aimet(q, stem)
    except ValueError as exc:  # e.g. an equalized model whose ReLU6 became per-channel clips
        log(f"AIMET export skipped: {exc}")
    try:
        export_onnx(q, example_input, stem + ".onnx")
        written.append(stem + ".onnx")
    except (ImportError, ValueError) as exc:  # e.g. onnx missing, or an activation grid QDQ cannot hold
        log(f"ONNX export skipped: {exc}")
    log("wrote " + ", ".join(written))


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    log = print
    os.makedirs(args.out, exist_ok=True)
    if args.data:
        model = load_imagenet_model(args, log)
        calib = testbed.imagenet_images(args.calib_data or args.data, args.samples, workers=args.workers)
        test_set = (testbed.imagenet_loader(args.data, limit=args.eval_images, workers=args.workers), None)
    else:
        model = load_fashion_model(args, log)
        train_x, _ = testbed.fashion_mnist("train")
        # A fixed random subset of the training images, labels unused.
        calib = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.samples]]
        test_x, test_y = testbed.fashion_mnist("test")
        test_set = (test_x[: args.eval_images], test_y[: args.eval_images])
    device = _device(args)
    fp32 = testbed.evaluate(model.to(device), *test_set, device=device)
    log(f"FP32 accuracy: {fp32:.2f}%")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for setting in args.settings.split(","):
        description, common = _setting_options(args, setting)
        common = dict(common, device=device, progress=not args.no_progress)
        baseline = dict(common, reconstruction="layer", activation_drop=0.0, learn_activation_steps=False)
        nearest_model = quantize(model, calib, QuantConfig(rounding="nearest", **baseline))
        nearest = testbed.evaluate(nearest_model, *test_set, device=device)
        accs, times = [], []
        for seed in seeds:
            start = time.perf_counter()
            config = QuantConfig(rounding="adaround", seed=seed, **common)
            # One directory per configuration: the same command resumes, another flag starts afresh.
            ckpt = os.path.join(args.out, f"ckpt_{args.arch}_{setting}_s{seed}_{config_tag(config)}")
            q = quantize(model, calib, config, checkpoint_dir=ckpt)
            accs.append(testbed.evaluate(q, *test_set, device=device))
            eval_time = time.perf_counter() - start - q.adaround_report.total_seconds
            times.append(time.perf_counter() - start)
            stem = os.path.join(args.out, f"{args.arch}_{setting}_seed{seed}")
            log(f"\n{description}, seed {seed}: AdaRound {accs[-1]:.2f}% (nearest {nearest:.2f}%)")
            log(q.adaround_report.table())
            log(f"evaluation {eval_time:.1f} s")
            write_artifacts(q, stem, calib[:2], f"{args.arch} {description}, seed {seed}", log)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        rows.append((description, f"{fp32:.2f}", f"{nearest:.2f}", f"{statistics.mean(accs):.2f}{spread}",
                     f"{statistics.mean(times):.0f}"))
    header = ("setting", "FP32", "nearest", "AdaRound", "time s")
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    log(f"\n{args.arch}, {args.iterations} iterations/layer, {args.samples} calibration images, seeds {args.seeds}")
    for row in (header, *rows):
        log("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
