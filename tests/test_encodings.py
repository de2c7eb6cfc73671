"""The AIMET export: the encodings in aimet-torch 2.x's layout decode exactly to our integer codes, the
rounded state dict rebuilds our weights, and the config asks for our kind of quantizers.
tests/test_aimet_roundtrip.py loads the same files into the real AIMET."""
import json

import pytest
import torch
import torch.nn as nn

import adaround_ext as ae
from adaround_ext.encodings import aimet_config, encodings, export_aimet, export_encodings, rounded_state_dict
from adaround_ext.folding import fold_batchnorm


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
    assert enc["version"] == "1.0.0" and set(enc) >= {"activation_encodings", "param_encodings"}
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
        # AIMET 2.x: module -> "input" | "output" -> index -> entry.
        act = enc["activation_encodings"][name]["input"]["0"]
        assert act["bitwidth"] == 8 and act["scale"] == pytest.approx(layer.input_quantizer.scale.item())


def test_encodings_of_an_unquantized_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLayer"):
        export_encodings(nn.Linear(2, 2), str(tmp_path / "x.json"))


def test_rounded_state_dict_loads_into_the_folded_float_model(quantized):
    """The state dict is the BN-folded float model with each weight at scale * (code - zero_point): loaded
    strictly into that model, it computes what the quantized model computes without its activation quantizers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    model.load_state_dict(rounded_state_dict(quantized), strict=True)
    for name, layer in quantized.named_modules():
        if isinstance(layer, ae.QuantizedLayer):
            w = layer.scale.reshape(-1, *[1] * (layer.codes.dim() - 1)) * (
                layer.codes.float() - layer.zero_point.reshape(-1, *[1] * (layer.codes.dim() - 1)))
            assert torch.equal(model.get_submodule(name).weight, w)


def test_rounded_state_dict_of_a_batchnorm_model_fits_the_folded_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    q = ae.quantize(model, torch.randn(8, 3, 6, 6), ae.QuantConfig(rounding="nearest", progress=False))
    folded = fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    folded.load_state_dict(rounded_state_dict(q), strict=True)


def test_aimet_config_asks_for_our_grids(quantized):
    config = aimet_config(quantized)
    assert config["defaults"]["per_channel_quantization"] == "True"
    assert config["defaults"]["params"]["is_symmetric"] == "False"  # the fixture's grids have zero points
    assert config["supergroups"] == [] and config["model_input"] == {"is_input_quantized": "True"}
    per_tensor = ae.quantize(nn.Sequential(nn.Linear(4, 3)), torch.randn(8, 4), ae.QuantConfig(
        rounding="nearest", per_channel=False, progress=False))
    assert aimet_config(per_tensor)["defaults"]["per_channel_quantization"] == "False"
    assert aimet_config(per_tensor)["defaults"]["params"]["is_symmetric"] == "True"


def test_export_aimet_writes_three_files(quantized, tmp_path):
    paths = export_aimet(quantized, str(tmp_path / "m"))
    assert [p[len(str(tmp_path)) + 1:] for p in paths] == ["m.encodings.json", "m.aimet_config.json",
                                                           "m.aimet_weights.pth"]
    with pytest.raises(ValueError, match="does not exist"):
        export_aimet(quantized, str(tmp_path / "missing" / "m"))


# The activation quantizers aimet-torch 2.42's QuantizationSimModel gives torchvision's resnet18 after
# prepare_model and fold_all_batch_norms with its default configuration (read off AIMET, not computed here).
AIMET_RESNET18_ACTIVATIONS = {("conv1", "input"), ("relu", "output"), ("avgpool", "output"), ("fc", "output")} | {
    (f"layer{i}.{j}.{m}", "output") for i in range(1, 5) for j in range(2) for m in ("relu", "conv2", "module_relu_1")
} | {(f"layer{i}.0.downsample.0", "output") for i in range(2, 5)}


def test_output_placement_names_what_aimet_quantizes():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    q = ae.quantize(model, torch.randn(4, 3, 32, 32), ae.QuantConfig(rounding="nearest", progress=False,
                                                                      activation_placement="outputs"))
    activations = encodings(q)["activation_encodings"]
    assert {(module, kind) for module, kinds in activations.items() for kind in kinds} == AIMET_RESNET18_ACTIVATIONS
