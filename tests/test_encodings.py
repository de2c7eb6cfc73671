"""AIMET-style encodings JSON: layout and exact decoding back to our integer codes."""
import json

import pytest
import torch
import torch.nn as nn

import adaround_ext as ae
from adaround_ext.encodings import export_encodings


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    x = torch.randn(32, 3, 6, 6)
    config = ae.QuantConfig(weight_bits=4, activation_bits=8, symmetric=False, iterations=20, num_samples=32,
                            progress=False, device="cpu")
    return ae.quantize(model, x, config)


def test_encodings_decode_to_the_same_codes(quantized, tmp_path):
    path = tmp_path / "enc.json"
    export_encodings(quantized, str(path))
    enc = json.loads(path.read_text())
    assert enc["version"] == "0.6.1" and set(enc) >= {"activation_encodings", "param_encodings"}
    for name, layer in quantized.named_modules():
        if not isinstance(layer, ae.QuantizedLayer):
            continue
        entries = enc["param_encodings"][f"{name}.weight"]
        assert len(entries) == layer.codes.shape[0]
        for c, e in enumerate(entries):
            assert e["bitwidth"] == 4 and e["dtype"] == "int" and e["is_symmetric"] == "False"
            assert e["min"] == pytest.approx(e["scale"] * e["offset"])
            # AIMET code q in [0, 15] with real = scale * (q + offset) -> ours: code = q + quant_min.
            w = layer.dequantized_weight()[c]
            q = torch.round(w / e["scale"] - e["offset"])
            assert q.min() >= 0 and q.max() <= 15
            assert torch.equal((q + layer.quant_min).to(layer.codes.dtype), layer.codes[c])
        act = enc["activation_encodings"][f"{name}.input"][0]
        assert act["bitwidth"] == 8 and act["scale"] == pytest.approx(layer.input_quantizer.scale.item())


def test_encodings_of_an_unquantized_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLayer"):
        export_encodings(nn.Linear(2, 2), str(tmp_path / "x.json"))
