"""The AIMET export loaded by the real AIMET (aimet-torch 2.42, benchmarks/peers/setup_aimet.sh): its
documented flow, strict, gives the simulated model exactly our quantizers and reproduces our quantized
model's logits and predictions, for both activation placements. Skipped where the AIMET environment
was not created. (benchmarks/peers/roundtrip.py counts equal predictions on the whole test set.)"""
import os
import sys

import pytest
import torch

import adaround_ext as ae

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peers"))
from roundtrip import AIMET_PYTHON, aimet_available, run_aimet  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not aimet_available(), reason=f"no AIMET environment at {AIMET_PYTHON} "
                                 "(benchmarks/peers/setup_aimet.sh creates it)")]


@pytest.mark.parametrize("placement", ["inputs", "outputs"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_aimet_reproduces_our_predictions(trained, data, tmp_path, placement, per_channel):
    calib = data["calib"][:128]
    q = ae.quantize(trained, calib, ae.QuantConfig(weight_bits=4, activation_bits=8, per_channel=per_channel,
                                                   iterations=50, num_samples=128, activation_placement=placement,
                                                   progress=False, device="cpu"))
    images = data["test"][0][:500]
    result = run_aimet(q, "resnet18", images, str(tmp_path / "resnet18"))
    assert "error" not in result, result.get("traceback")
    assert result["activation_quantizers"] == result["our_activation_quantizers"] == (21 if placement == "inputs"
                                                                                      else 31)
    assert result["weight_quantizers"] == 21
    # The same arithmetic in another implementation: float rounding differences flip a value at a
    # quantization boundary now and then (one output step), which can flip a near-tie between classes.
    with torch.no_grad():
        ours = q(images)
    theirs = torch.tensor(result["logits"])
    assert (ours - theirs).abs().mean() < 0.01 * (ours.max() - ours.min())
    agree = (torch.tensor(result["predictions"]) == torch.tensor(result["ours"])).float().mean().item()
    assert agree >= 0.99
