"""quantize(), save and load on models and files a user brings: every weight is quantized or listed as
kept in float, and every failure names the layer, the argument or the file."""
import os

import pytest
import torch
import torch.nn as nn
import torchvision

import adaround_ext as ae
from test_bad_input import FAST, quantized_small_net, small_net


class AttentionNet(nn.Module):
    """A token model: Linear on [N, T, C] inputs around an attention whose projections no Linear calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attn(h, h, h)
        return self.head(h)


class RecurrentNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.head(h[:, -1])


def tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts the head at zero: output all zero
    return model


def relative_error(q, model, x):
    with torch.no_grad():
        ref = model(x)
        return ((q(x) - ref).norm() / ref.norm()).item()


def test_linear_over_tokens_is_quantized():
    """Was: "inputs must be 2-D" with no layer name; a transformer could not be quantized at all."""
    model = tiny_vit()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    config = ae.QuantConfig(weight_bits=8, **FAST)
    q = ae.quantize(model, x, config)
    mlp = q.encoder.layers.encoder_layer_0.mlp
    assert isinstance(mlp[0], ae.QuantizedLayer) and isinstance(mlp[3], ae.QuantizedLayer)
    assert relative_error(q, model, x) < 0.02
    # At 4 bits the learned rounding of a token Linear reconstructs better than rounding to nearest.
    q4 = ae.quantize(model, x, ae.QuantConfig(weight_bits=4, **dict(FAST, iterations=200)))
    mlp_report = {r.name: r for r in q4.adaround_report.layers}["encoder.layers.encoder_layer_0.mlp.0"]
    assert mlp_report.adaround_error < mlp_report.nearest_error


@pytest.mark.parametrize("make, kept, quantized", [
    (AttentionNet, ["attn (MultiheadAttention)", "attn.out_proj (NonDynamicallyQuantizableLinear, not called by "
                                                  "forward)"], ["embed", "head"]),
    (RecurrentNet, ["gru (GRU)"], ["head"]),
])
def test_weights_left_in_float_are_listed_and_warned(make, kept, quantized, tmp_path, caplog):
    """Was: the attention projections and the GRU stayed float with no warning and no kept_float entry."""
    model = make().eval()
    x = torch.randn(32, 5, 8, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="adaround_ext"):
        q = ae.quantize(model, x, ae.QuantConfig(weight_bits=8, **FAST))
    assert q.adaround_report.kept_float == kept
    assert any(all(k in r.getMessage() for k in kept) for r in caplog.records)
    assert [n for n, m in q.named_modules() if isinstance(m, ae.QuantizedLayer)] == quantized
    assert relative_error(q, model, x) < 0.02
    # The float-kept Linear is expected float again on load, and the load reproduces the model.
    path = str(tmp_path / "q.pt")
    ae.save_quantized(q, path)
    loaded = ae.load_quantized(make(), path)
    torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)


# ---- files --------------------------------------------------------------------------------------

def damaged_copies(good: bytes):
    yield "truncated", good[: len(good) // 2]
    yield "empty", b""
    yield "garbage", bytes(range(256)) * 4
    yield "json", b'{"format": "adaround_ext/1"}'


def test_unreadable_saved_files_are_errors_naming_the_file(tmp_path):
    """Was: raw EOFError / UnpicklingError / KeyError 'folded_batchnorm', naming no file."""
    q, _ = quantized_small_net(tmp_path)
    good = tmp_path / "q.pt"
    ae.save_quantized(q, str(good))
    for label, content in damaged_copies(good.read_bytes()):
        path = tmp_path / f"{label}.pt"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{label}.pt"):
            ae.load_quantized(small_net(), str(path))
    keys_missing = tmp_path / "keys.pt"
    torch.save({"format": "adaround_ext/1"}, str(keys_missing))
    with pytest.raises(ValueError, match="keys.pt' is not an adaround_ext quantized model"):
        ae.load_quantized(small_net(), str(keys_missing))
    with pytest.raises(ValueError, match="absent.pt"):
        ae.load_quantized(small_net(), str(tmp_path / "absent.pt"))


def test_load_into_a_model_without_the_layers_names_the_file(tmp_path):
    """Was: "'MobileNetV2' object has no attribute 'layer1'"."""
    q = ae.quantize(torchvision.models.resnet18(num_classes=5).eval(), torch.randn(8, 3, 32, 32),
                    ae.QuantConfig(rounding="nearest", **dict(FAST, num_samples=8)))
    path = str(tmp_path / "resnet18.pt")
    ae.save_quantized(q, path)
    with pytest.raises(ValueError, match=r"resnet18.pt' .*'(conv1|bn1|layer1[.\w]*)' that the model does not have"):
        ae.load_quantized(torchvision.models.mobilenet_v2(num_classes=5), path)


def test_save_into_a_missing_directory_names_the_path(tmp_path):
    q, _ = quantized_small_net(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ae.save_quantized(q, str(tmp_path / "absent" / "q.pt"))


def test_checkpoint_that_cannot_be_written_names_the_file_and_keeps_finished_layers(tmp_path, monkeypatch):
    """A checkpoint directory that turns read-only after some layers (simulated: root ignores modes)."""
    import adaround_ext.checkpoint as checkpoint

    samples = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    config = ae.QuantConfig(**FAST)
    replace, written = os.replace, []

    def replace_then_fail(src, dst):
        if len(written) == 2:  # the manifest and the first layer went through
            raise PermissionError(13, "Permission denied", src)
        written.append(dst)
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match=r"checkpoint file .*layer\.3\.pt.*Permission denied"):
        ae.quantize(small_net(), samples, config, checkpoint_dir=str(tmp_path))
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert sorted(p for p in os.listdir(tmp_path)) == ["layer.0.pt", "manifest.json"]  # no temporary left
    resumed = ae.quantize(small_net(), samples, config, checkpoint_dir=str(tmp_path))
    fresh = ae.quantize(small_net(), samples, config)
    torch.testing.assert_close(resumed(samples), fresh(samples), rtol=0, atol=0)


# ---- values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["adaround", "nearest"])
def test_nan_weight_is_an_error_naming_the_layer(rounding):
    """Was: "scale must be positive and finite everywhere", naming no layer."""
    model = small_net()
    with torch.no_grad():
        model[6].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 6: its weight holds NaN or Inf"):
        ae.quantize(model, torch.randn(32, 3, 6, 6), ae.QuantConfig(rounding=rounding, **FAST))


@pytest.mark.parametrize("rounding", ["adaround", "nearest"])
def test_nan_calibration_data_is_an_error_naming_the_sample(rounding):
    """Was (baseline rounding with activation bits): "cannot convert float NaN to integer"."""
    x = torch.randn(32, 3, 6, 6)
    x[5, 1, 2, 2] = float("nan")
    config = ae.QuantConfig(rounding=rounding, **dict(FAST, activation_bits=8))
    with pytest.raises(ValueError, match="calibration_data holds NaN or Inf in 1 of 32 samples .*sample 5"):
        ae.quantize(small_net(), x, config)


def test_activation_range_that_overflows_names_the_layer():
    """Finite data whose activations overflow float32: was "cannot convert float infinity to integer"."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = torch.full((32, 4), 1e10)
    with pytest.raises(ValueError, match="layer 1: its input holds NaN or Inf"):
        ae.quantize(model, x, ae.QuantConfig(rounding="nearest", **dict(FAST, activation_bits=8)))
