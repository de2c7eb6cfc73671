"""Shared helpers of the benchmarks: timing and the ResNet18 shapes of the testbed."""
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

# (name, weight shape, stride, input spatial size on the 32x32 Fashion-MNIST testbed, ImageNet size)
RESNET18_CONVS = [
    ("conv1", (64, 3, 7, 7), 2, 32, 224),
    ("layer1.0.conv1", (64, 64, 3, 3), 1, 8, 56),
    ("layer2.0.conv1", (128, 64, 3, 3), 2, 8, 56),
    ("layer2.0.conv2", (128, 128, 3, 3), 1, 4, 28),
    ("layer3.0.conv1", (256, 128, 3, 3), 2, 4, 28),
    ("layer3.0.conv2", (256, 256, 3, 3), 1, 2, 14),
    ("layer4.0.conv1", (512, 256, 3, 3), 2, 2, 14),
    ("layer4.0.conv2", (512, 512, 3, 3), 1, 1, 7),
]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats=7, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*header))
    for row in rows:
        print(line.format(*row))


def mean_spread(values):
    """"mean ± sample standard deviation" of accuracies (the mean alone for one value)."""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def add_testbed_arguments(parser, arch="resnet18", eval_images=10000, eval_help=None):
    """--arch, --checkpoint, --samples and --eval-images: what testbed_model_and_data reads."""
    from adaround_testbed import testbed

    parser.add_argument("--arch", default=arch, choices=testbed.ARCHS)
    parser.add_argument("--checkpoint", default=None, help="default runs/fashion_mnist_<arch>.pt")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--eval-images", type=int, default=eval_images, help=eval_help)


def testbed_model_and_data(args):
    """(model, calibration images, (test images, labels), FP32 accuracy) for a benchmark's --arch,
    --checkpoint (default runs/fashion_mnist_<arch>.pt), --samples and --eval-images."""
    from adaround_testbed import testbed

    path = args.checkpoint or os.path.join(ROOT, "runs", f"fashion_mnist_{args.arch}.pt")
    model = testbed.load_network(args.arch, path)
    calib, test = testbed.calibration_and_test(args.samples, args.eval_images)
    return model, calib, test, testbed.evaluate(model, *test)


def setting_config(setting, iterations, samples, seed, **options):
    """QuantConfig of one of the main job's settings (adaround_testbed/cli.py) for a CPU benchmark run:
    cross-layer equalization where the setting is per-tensor, as the main job gives it."""
    from adaround_ext import QuantConfig
    from adaround_testbed.cli import SETTINGS

    _, overrides = SETTINGS[setting]
    return QuantConfig(iterations=iterations, num_samples=samples, seed=seed, device="cpu", progress=False,
                       cross_layer_equalization=not overrides["per_channel"], **overrides, **options)
