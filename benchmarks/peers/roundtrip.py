"""Round trip through the real AIMET: quantize a testbed model here, export it for AIMET
(adaround_ext.encodings.export_aimet), load the files with AIMET's API in its own environment
(aimet_load.py, strict) and compare the simulated model's predictions with ours, image by image.

    bash benchmarks/peers/setup_aimet.sh          # once: benchmarks/peers/.venv-aimet
    PYTHONPATH=python .venv/bin/python benchmarks/peers/roundtrip.py --arch resnet18 \
        --checkpoint runs/fashion_mnist_resnet18.pt --settings w4a8,w4a8-paper --placements inputs,outputs

tests/test_aimet_roundtrip.py runs the same functions on a small model when the AIMET environment exists.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
AIMET_PYTHON = os.path.join(HERE, ".venv-aimet", "bin", "python")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "python"))

from adaround_ext.encodings import export_aimet  # noqa: E402
from adaround_ext.modules import ChannelClip  # noqa: E402


def aimet_available() -> bool:
    return os.path.exists(AIMET_PYTHON)


def run_aimet(quantized, arch: str, images: torch.Tensor, stem: str, timeout: float = 900) -> dict:
    """Exports `quantized` at `stem`, has AIMET load it, and returns AIMET's result with its
    predictions next to ours ("ours") and the number of our activation quantizers."""
    if any(isinstance(m, ChannelClip) for m in quantized.modules()):
        raise ValueError("a model with ChannelClips (cross-layer equalization across ReLU6) has no AIMET "
                         "counterpart: AIMET's torchvision model keeps its ReLU6")
    export_aimet(quantized, stem)
    torch.save(images, stem + ".images.pt")
    out = stem + ".aimet_result.json"
    command = [AIMET_PYTHON, os.path.join(HERE, "aimet_load.py"), "--arch", arch, "--stem", stem,
               "--images", stem + ".images.pt", "--out", out]
    subprocess.run(command, check=True, timeout=timeout, capture_output=True)
    with open(out) as f:
        result = json.load(f)
    with torch.no_grad():
        result["ours"] = torch.cat([quantized(b) for b in images.split(500)]).argmax(1).tolist()
    with open(stem + ".encodings.json") as f:
        activation = json.load(f)["activation_encodings"]
    result["our_activation_quantizers"] = sum(len(per_index) for kinds in activation.values()
                                              for per_index in kinds.values())
    return result


def main():
    from adaround_ext import QuantConfig, quantize
    from adaround_testbed import testbed
    from adaround_testbed.cli import SETTINGS

    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--settings", default="w4a8,w4a8-paper")
    p.add_argument("--placements", default="inputs,outputs")
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--images", type=int, default=10000, help="test images compared")
    p.add_argument("--out", default="runs/aimet_roundtrip")
    args = p.parse_args()
    if not aimet_available():
        raise SystemExit(f"no AIMET environment at {AIMET_PYTHON}: run benchmarks/peers/setup_aimet.sh")
    os.makedirs(args.out, exist_ok=True)
    model = testbed.load_network(args.arch, args.checkpoint)
    calib, (images, labels) = testbed.calibration_and_test(args.samples, args.images)
    print("| setting | placement | activation quantizers (ours / AIMET after loading) | predictions equal | "
          "accuracy ours | accuracy AIMET |\n| --- | --- | --- | --- | --- | --- |")
    for setting in args.settings.split(","):
        _, overrides = SETTINGS[setting]
        for placement in args.placements.split(","):
            config = QuantConfig(**overrides, iterations=args.iterations, num_samples=args.samples, device="cpu",
                                 progress=False, activation_placement=placement)
            q = quantize(model, calib, config)
            r = run_aimet(q, args.arch, images, os.path.join(args.out, f"{args.arch}_{setting}_{placement}"))
            if "error" in r:
                print(f"| {setting} | {placement} | AIMET refused the files: {r['error']} | | | |")
                continue
            ours, theirs = torch.tensor(r["ours"]), torch.tensor(r["predictions"])
            print(f"| {setting} | {placement} | {r['our_activation_quantizers']} / {r['activation_quantizers']} | "
                  f"{(ours == theirs).sum().item()} / {len(ours)} | {100 * (ours == labels).float().mean():.2f} | "
                  f"{100 * (theirs == labels).float().mean():.2f} |", flush=True)


if __name__ == "__main__":
    main()
