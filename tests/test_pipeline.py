"""End to end on a Fashion-MNIST subset: quantize(), baselines, save/load, resume, bad input."""
import copy
import importlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaround_ext as ae
from adaround_testbed import testbed
from adaround_ext.folding import fold_batchnorm
from adaround_ext.quantize import execution_order, following_activations
from adaround_ext.scales import init_activation_grid
from conftest import needs_cuda

FAST = dict(iterations=200, lr=1e-2, num_samples=256, progress=False, device="cpu")


@pytest.fixture(scope="session")
def fp32_accuracy(trained, data):
    return testbed.evaluate(trained, *data["test"])


def accuracy(model, data):
    return testbed.evaluate(model, *data["test"])


def test_fp32_model_learned(fp32_accuracy):
    assert fp32_accuracy > 65.0  # measured 73.4 after this short budget


def test_batchnorm_folding_keeps_outputs(trained, data):
    folded = fold_batchnorm(copy.deepcopy(trained))
    x = data["calib"][:16]
    torch.testing.assert_close(folded(x), trained(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_layer_order_and_following_activations(trained, data):
    folded = fold_batchnorm(copy.deepcopy(trained))
    order = execution_order(folded, data["calib"][:1])
    assert order[0] == "conv1" and order[-1] == "fc" and len(order) == 21
    assert order.index("layer2.0.downsample.0") > order.index("layer1.1.conv2")
    acts = following_activations(folded)
    assert acts["conv1"] == "relu" and acts["layer1.0.conv1"] == "relu"
    assert acts["layer1.0.conv2"] == "none" and acts["layer2.0.downsample.0"] == "none" and acts["fc"] == "none"


@pytest.fixture(scope="session")
def w3_results(trained, data):
    config = dict(FAST, weight_bits=3, per_channel=False, scale_method="minmax", activation_bits=None)
    nearest = ae.quantize(trained, data["calib"], ae.QuantConfig(rounding="nearest", **config))
    ada = ae.quantize(trained, data["calib"], ae.QuantConfig(rounding="adaround", **config))
    return accuracy(nearest, data), accuracy(ada, data), ada


@pytest.mark.slow  # over 10 s on 2 cores
def test_adaround_beats_nearest_at_w3_per_tensor(w3_results, fp32_accuracy):
    nearest, ada, model = w3_results
    # Measured with 200 iterations per layer: FP32 73.4, nearest below 17, AdaRound 31.7.
    assert ada > nearest + 15.0
    report = model.adaround_report
    assert len(report.layers) == 21
    improved = sum(r.adaround_error < r.nearest_error for r in report.layers)
    assert improved >= 14, [(r.name, r.nearest_error, r.adaround_error) for r in report.layers]


@pytest.mark.slow  # over 10 s on 2 cores
def test_w4a8_stays_close_to_fp32(trained, data, fp32_accuracy):
    q = ae.quantize(trained, data["calib"], ae.QuantConfig(weight_bits=4, activation_bits=8, **FAST))
    assert accuracy(q, data) > fp32_accuracy - 3.0
    layers = [m for m in q.modules() if isinstance(m, ae.QuantizedLayer)]
    assert len(layers) == 21 and all(m.input_quantizer is not None for m in layers)
    assert all(m.codes.dtype == torch.int8 and m.codes.min() >= -8 and m.codes.max() <= 7 for m in layers)


@pytest.mark.parametrize("quantized_inputs, bits", [(True, 8), (False, 8), (None, 8), (None, 4), (False, 4)])
def test_adaround_sees_the_inputs_the_quantized_model_feeds_each_layer(trained, data, monkeypatch, quantized_inputs,
                                                                       bits):
    """With quantized_inputs, each layer's cached x^ is its input in the final model put through the
    layer's quantizer, whose range is that input's min/max; without, x^ is the float input of the
    final model with every input quantizer off (they are calibrated afterwards). The default (None)
    quantizes them at 4-bit activations, not at 8."""
    quantized = quantized_inputs if quantized_inputs is not None else bits <= 4
    pipeline = importlib.import_module("adaround_ext.quantize")  # the module, not the function of that name
    original, seen = pipeline.optimize_layer, {}

    def recording(*args, **kwargs):
        seen[len(seen)] = args[7].clone()  # the inputs cache
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "optimize_layer", recording)
    config = ae.QuantConfig(**dict(FAST, iterations=20, num_samples=64), quantized_inputs=quantized_inputs,
                            activation_bits=bits, activation_range="minmax")
    q = ae.quantize(trained, data["calib"], config)
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, ae.QuantizedLayer)]
    quantizers = {n: m.input_quantizer for n, m in layers}
    if not quantized:
        for _, m in layers:
            m.input_quantizer = None
    raw = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: raw.setdefault(n, a[0].clone())) for n, m in layers]
    with torch.no_grad():
        q(data["calib"][:64])
    for h in handles:
        h.remove()
    order = [r.name for r in q.adaround_report.layers]  # the order optimize_layer was called in
    assert len(seen) == len(layers) == 21
    for i, name in enumerate(order):
        x, quantizer = raw[name], quantizers[name]
        expected = ae.ActivationQuantizer(*init_activation_grid(x.min().item(), x.max().item(), bits))
        assert quantizer.scale.item() == pytest.approx(expected.scale.item(), rel=1e-6), name
        assert quantizer.zero_point.item() == expected.zero_point.item(), name
        torch.testing.assert_close(seen[i], quantizer(x) if quantized else x, rtol=0, atol=0, msg=name)


def test_original_model_untouched(trained, data):
    before = copy.deepcopy(trained.state_dict())
    ae.quantize(trained, data["calib"][:64], ae.QuantConfig(rounding="nearest", **dict(FAST, num_samples=64)))
    after = trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_load_roundtrip_gives_identical_logits(w3_results, data, tmp_path):
    _, _, model = w3_results
    path = tmp_path / "q.pt"
    ae.save_quantized(model, str(path))
    fresh = testbed.network("resnet18", 10)  # a fresh torchvision model, random weights
    loaded = ae.load_quantized(fresh, str(path))
    x = data["test"][0][:64]
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("rounding", ["floor", "ceil", "stochastic"])
def test_baselines_run_through_the_pipeline(trained, data, rounding):
    config = ae.QuantConfig(rounding=rounding, weight_bits=4, activation_bits=None, **dict(FAST, num_samples=32))
    q = ae.quantize(trained, data["calib"], config)
    layer = q.get_submodule("layer1.0.conv1")
    w = fold_batchnorm(copy.deepcopy(trained)).get_submodule("layer1.0.conv1").weight.detach()
    ratio = w / layer.scale.view(-1, 1, 1, 1)
    lower = torch.floor(ratio).clamp(-8, 7)
    if rounding == "floor":
        assert torch.equal(layer.codes.float(), lower)
    elif rounding == "ceil":
        assert torch.equal(layer.codes.float(), torch.ceil(ratio).clamp(-8, 7))
    else:
        up = (layer.codes.float() - lower)
        assert set(up.unique().tolist()) <= {0.0, 1.0} and 0.2 < up.mean().item() < 0.8
    assert 0 < accuracy(q, data) <= 100


@pytest.mark.slow  # over 10 s on 2 cores
def test_resume_after_interruption_gives_the_same_model(trained, data, tmp_path):
    # quantized_inputs: the input quantizers calibrated during the walk go through the checkpoints too.
    config = ae.QuantConfig(weight_bits=3, activation_bits=8, quantized_inputs=True,
                            **dict(FAST, iterations=40, num_samples=64))

    class Interrupted(Exception):
        pass

    def stop_after_layer_4(index, name):
        if index == 4:
            raise Interrupted

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        ae.quantize(trained, data["calib"], config, checkpoint_dir=ckpt, on_layer_done=stop_after_layer_4)
    assert len([f for f in os.listdir(ckpt) if f.startswith("layer.")]) == 5
    resumed = ae.quantize(trained, data["calib"], config, checkpoint_dir=ckpt)
    straight = ae.quantize(trained, data["calib"], config)
    for (name, a), (_, b) in zip(resumed.named_buffers(), straight.named_buffers()):
        assert torch.equal(a, b), name


# ---- bad input -------------------------------------------------------------------------------

def test_empty_calibration_data(trained):
    with pytest.raises(ValueError, match="yielded no samples"):
        ae.quantize(trained, [], ae.QuantConfig(**FAST))
    with pytest.raises(ValueError, match="yielded no samples"):
        ae.quantize(trained, torch.empty(0, 3, 32, 32), ae.QuantConfig(**FAST))


def test_model_without_quantizable_layers():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="no Linear, Conv1d/2d or ConvTranspose1d/2d layer"):
        ae.quantize(model, torch.randn(4, 3, 8, 8), ae.QuantConfig(**FAST))


class Decoder(nn.Module):
    """String padding, a transposed convolution with BatchNorm, and a Conv3d that stays in float."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same", dilation=2)
        self.valid = nn.Conv2d(8, 8, 3, padding="valid")
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.up_bn = nn.BatchNorm2d(6)
        self.volume = nn.Conv3d(6, 4, 1)

    def forward(self, x):
        x = torch.relu(self.valid(torch.relu(self.same(x))))
        x = torch.relu(self.up_bn(self.up(x)))
        return self.volume(x.unsqueeze(2)).squeeze(2)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    model = Decoder().eval()
    model.up_bn.running_mean.uniform_(-0.5, 0.5)
    model.up_bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(64, 3, 10, 10)
    config = ae.QuantConfig(weight_bits=4, activation_bits=8, **dict(FAST, num_samples=64, iterations=100))
    return model, x, ae.quantize(model, x, config)


def test_transposed_conv_string_padding_and_layers_kept_in_float(decoder, tmp_path):
    model, x, q = decoder
    report = q.adaround_report
    assert report.kept_float == ["volume (Conv3d)"]
    assert "kept in floating point: volume (Conv3d)" in report.table()
    assert isinstance(q.volume, nn.Conv3d) and torch.equal(q.volume.weight, model.volume.weight)
    # The transposed layer: BatchNorm folded in, per-channel grid on its output channels (axis 1).
    assert q.adaround_folded_batchnorm == ["up_bn"]
    up = q.up
    assert up.kind == "conv_transpose2d" and up.axis == 1 and tuple(up.scale.shape) == (6,)
    assert up.codes.shape == model.up.weight.shape and up.codes.min() >= -8 and up.codes.max() <= 7
    [up_report] = [r for r in report.layers if r.name == "up"]
    assert up_report.adaround_error < up_report.nearest_error
    # Each quantized layer computes what PyTorch's own op gives with the dequantized weight.
    inputs = {"same": torch.randn(2, 3, 10, 10), "valid": torch.randn(2, 8, 10, 10), "up": torch.randn(2, 8, 8, 8)}
    expected = {
        "same": lambda l, t: F.conv2d(t, l.dequantized_weight(), l.bias, padding="same", dilation=2),
        "valid": lambda l, t: F.conv2d(t, l.dequantized_weight(), l.bias, padding="valid"),
        "up": lambda l, t: F.conv_transpose2d(t, l.dequantized_weight(), l.bias, stride=2, padding=1,
                                              output_padding=1),
    }
    for name, reference in expected.items():
        layer = q.get_submodule(name)
        layer_input = layer.input_quantizer(inputs[name])
        torch.testing.assert_close(layer(inputs[name]), reference(layer, layer_input))
    assert q(x).shape == model(x).shape == (64, 4, 16, 16)
    # The saved model reloads into a fresh Decoder with the same outputs.
    path = tmp_path / "decoder.pt"
    ae.save_quantized(q, str(path))
    assert torch.equal(ae.load_quantized(Decoder(), str(path))(x), q(x))


def test_uneven_same_padding_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same")).eval()
    with pytest.raises(ValueError, match="padding='same' with kernel \\(4, 4\\)"):
        ae.quantize(model, torch.randn(4, 3, 8, 8),
                    ae.QuantConfig(**dict(FAST, num_samples=4, iterations=2, batch_size=2)))


@pytest.mark.parametrize("field,value", [("weight_bits", 1), ("weight_bits", 9), ("activation_bits", 16),
                                         ("first_layer_bits", 0)])
def test_bits_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer from 2 to 8"):
        ae.QuantConfig(**{field: value})


def test_batch_larger_than_the_calibration_set(trained):
    with pytest.raises(ValueError, match="batch_size \\(32\\) is larger than the 16 calibration samples"):
        ae.quantize(trained, torch.randn(16, 3, 32, 32), ae.QuantConfig(**dict(FAST, batch_size=32)))


def test_calibration_batches_of_the_wrong_shape(trained):
    with pytest.raises(ValueError, match="do not fit the model"):
        ae.quantize(trained, torch.randn(8, 1, 32, 32), ae.QuantConfig(**FAST))
    loader = [(torch.randn(4, 3, 32, 32), 0), (torch.randn(4, 3, 16, 16), 0)]
    with pytest.raises(ValueError, match="different sample shapes"):
        ae.quantize(trained, loader, ae.QuantConfig(**FAST))


def test_calibration_data_holding_nan():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    samples = torch.randn(40, 3, 6, 6)
    samples[3, 0, 0, 0] = float("nan")
    config = ae.QuantConfig(iterations=5, batch_size=8, progress=False, device="cpu")
    with pytest.raises(ValueError, match="calibration_data holds NaN or Inf in 1 of 40 samples"):
        ae.quantize(model, samples, config)


def test_input_that_overflows_in_the_layer_walk_names_the_layer():
    """Finite data whose activations overflow float32: the first layer whose cache holds them is named."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    config = ae.QuantConfig(iterations=5, batch_size=8, progress=False, device="cpu", quantized_inputs=True)
    with pytest.raises(RuntimeError, match="layer 0: targets contains NaN or Inf"):
        ae.quantize(model, torch.full((40, 4), 1e10), config)


def test_checkpoint_directory_of_another_model(trained, data, tmp_path):
    config = ae.QuantConfig(rounding="nearest", **dict(FAST, num_samples=16))
    ae.quantize(trained, data["calib"], config, checkpoint_dir=str(tmp_path))
    other = testbed.network("resnet18", 10).eval()
    with pytest.raises(ValueError, match="holds a run of a different model"):
        ae.quantize(other, data["calib"], config, checkpoint_dir=str(tmp_path))


def test_checkpoint_directories_are_named_per_configuration():
    from adaround_ext.checkpoint import config_tag

    base = ae.QuantConfig()
    assert config_tag(base) == config_tag(ae.QuantConfig())
    # Settings that cannot change the result share a directory, so a run resumes with or without them.
    assert config_tag(base) == config_tag(ae.QuantConfig(progress=False, device="cpu", cuda_graph=True))
    for change in (dict(quantized_inputs=True), dict(seed=1), dict(iterations=10), dict(num_samples=512)):
        assert config_tag(ae.QuantConfig(**change)) != config_tag(base), change
    # A default that resolves by other fields names the directory of its resolved value.
    assert config_tag(ae.QuantConfig(quantized_inputs=False)) == config_tag(base)
    a4 = ae.QuantConfig(activation_bits=4)
    assert config_tag(a4) == config_tag(ae.QuantConfig(activation_bits=4, quantized_inputs=True))
    assert config_tag(a4) != config_tag(ae.QuantConfig(activation_bits=4, quantized_inputs=False))
    block = dict(activation_bits=4, reconstruction="block")
    assert config_tag(ae.QuantConfig(**block)) == config_tag(ae.QuantConfig(**block, inner_activations="float"))
    assert config_tag(ae.QuantConfig(**block)) != config_tag(ae.QuantConfig(**block, inner_activations="quantized"))
    qdrop = dict(block, activation_drop=0.5)
    assert config_tag(ae.QuantConfig(**qdrop)) == config_tag(ae.QuantConfig(**qdrop, inner_activations="quantized"))
    # Without activation quantizers in the loop (A8, float inputs) it cannot be set, and auto names nothing.
    a8 = dict(activation_bits=8, reconstruction="block")
    assert not ae.QuantConfig(**a8).activations_in_reconstruction
    assert config_tag(ae.QuantConfig(**a8)) == config_tag(ae.QuantConfig(**a8, quantized_inputs=False))


def test_load_into_a_mismatched_model(w3_results, tmp_path):
    _, _, model = w3_results
    path = tmp_path / "q.pt"
    ae.save_quantized(model, str(path))
    with pytest.raises(ValueError, match="does not match"):
        ae.load_quantized(testbed.network("resnet18", 7), str(path))
    with pytest.raises(ValueError, match="not an adaround_ext quantized model"):
        torch.save({"x": 1}, str(tmp_path / "bad.pt"))
        ae.load_quantized(testbed.network("resnet18", 10), str(tmp_path / "bad.pt"))


def test_cache_placement_choices():
    from adaround_ext.caching import cache_location

    with pytest.raises(ValueError, match="cache_placement"):
        ae.QuantConfig(cache_placement="gpu")
    config = lambda placement: ae.QuantConfig(cache_placement=placement, progress=False)  # noqa: E731
    # Host caches only make sense for a CUDA device; the decision itself needs no GPU for these two.
    assert cache_location(config("host"), torch.device("cuda"), 10) == "pinned host"
    assert cache_location(config("device"), torch.device("cuda"), 10**15) == "device"
    for placement in ("auto", "host", "device"):
        assert cache_location(config(placement), torch.device("cpu"), 10**15) == "device"


@needs_cuda
def test_caches_in_pinned_host_memory_are_streamed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(64, 3, 8, 8)
    common = dict(weight_bits=4, activation_bits=None, iterations=50, num_samples=64, progress=False, device="cuda")
    host = ae.quantize(model, x, ae.QuantConfig(cache_placement="host", **common))
    device = ae.quantize(model, x, ae.QuantConfig(cache_placement="device", **common))
    assert [r.cache_location for r in host.adaround_report.layers] == ["pinned host"] * 2
    assert [r.cache_location for r in device.adaround_report.layers] == ["cuda"] * 2
    assert "pinned host" in host.adaround_report.table()
    with torch.no_grad():
        assert torch.isfinite(host(x.cuda())).all()
