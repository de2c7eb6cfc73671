"""activation_placement="outputs": quantizers on the model input and op outputs (placement.py), checked
against a forward pass written out by hand, through save/load, deepcopy and ONNX, and its errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaround_ext as ae
from adaround_ext.placement import aimet_key_of, output_quantizer_slots


class Residual(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, added to the ReLU's output, functional ReLU, max and average
    pooling, Linear: every rule of the placement in one model."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.maxpool, self.avgpool = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = F.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.avgpool(self.maxpool(z)), 1))


@pytest.fixture(scope="module")
def placed():
    torch.manual_seed(0)
    model = Residual().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 3, 8, 8)
    q = ae.quantize(model, x, ae.QuantConfig(activation_placement="outputs", iterations=20, batch_size=8,
                                             num_samples=32, progress=False, device="cpu"))
    return model, q, x


def test_quantizers_sit_where_the_rules_put_them(placed):
    _, q, x = placed
    by_key = {aimet_key_of(q, key): quantizer for key, quantizer in output_quantizer_slots(q).items()}
    # The add feeds only the ReLU (fused: quantized after it); max pooling makes no new values.
    assert set(by_key) == {("conv1", "input", 0), ("relu", "output", 0), ("conv2", "output", 0),
                           ("module_relu_1", "output", 0), ("avgpool", "output", 0), ("fc", "output", 0)}
    assert all(isinstance(m, ae.ActivationQuantizer) for m in by_key.values())
    assert all(m.input_quantizer is None for m in q.modules() if isinstance(m, ae.QuantizedLayer))

    def layer(name, h):
        m = q.get_submodule(name)
        return ae.modules.apply_layer(m, h, m.dequantized_weight(), m.bias)

    Q = lambda name, kind="output": by_key[(name, kind, 0)]  # noqa: E731
    with torch.no_grad():
        a = Q("relu")(torch.relu(layer("conv1", Q("conv1", "input")(x))))
        c = Q("conv2")(layer("conv2", a))
        r = Q("module_relu_1")(torch.relu(c + a))
        p = Q("avgpool")(F.adaptive_avg_pool2d(F.max_pool2d(r, 2), 1))
        expected = Q("fc")(layer("fc", p.flatten(1)))
        torch.testing.assert_close(q(x), expected)


def test_placement_does_not_change_the_learned_rounding(placed):
    """With float activations during AdaRound (quantized_inputs off), where the quantizers go afterwards
    leaves the codes alone."""
    model, q, x = placed
    inputs = ae.quantize(model, x, ae.QuantConfig(activation_placement="inputs", iterations=20, batch_size=8,
                                                  num_samples=32, progress=False, device="cpu"))
    for name in ("conv1", "conv2", "fc"):
        assert torch.equal(q.get_submodule(name).codes, inputs.get_submodule(name).codes)


def test_report_lists_the_ranges_by_aimet_name(placed):
    _, q, _ = placed
    ranges = q.adaround_report.activation_ranges
    assert set(ranges) == {"conv1 input 0", "relu output 0", "conv2 output 0", "module_relu_1 output 0",
                           "avgpool output 0", "fc output 0"}
    assert ranges["relu output 0"][0] == 0.0  # a ReLU's output is never negative
    assert "module_relu_1 output 0" in q.adaround_report.table()


def test_save_load_and_deepcopy(placed, tmp_path):
    _, q, x = placed
    ae.save_quantized(q, str(tmp_path / "q.pt"))
    loaded = ae.load_quantized(Residual(), str(tmp_path / "q.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)
    copied = copy.deepcopy(q)
    assert copied.adaround_report is not None and copied.adaround_folded_batchnorm == ["bn1", "bn2"]
    ae.save_quantized(copied, str(tmp_path / "copy.pt"))  # a copy keeps what a save needs
    with torch.no_grad():
        torch.testing.assert_close(copied(x), q(x), rtol=0, atol=0)
        reloaded = ae.load_quantized(Residual(), str(tmp_path / "copy.pt"))
        torch.testing.assert_close(reloaded(x), q(x), rtol=0, atol=0)

    class OtherGraph(Residual):
        def forward(self, x):  # no residual addition: the file's quantizer on it has no place here
            z = F.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
            return self.fc(torch.flatten(self.avgpool(self.maxpool(z)), 1))

    with pytest.raises(ValueError, match="q.pt.*do not fit the model's graph"):
        ae.load_quantized(OtherGraph(), str(tmp_path / "q.pt"))


def test_onnx_export_has_a_qdq_pair_per_quantizer(placed, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from adaround_ext.onnx_export import export_onnx

    _, q, x = placed
    export_onnx(q, x[:2], str(tmp_path / "q.onnx"))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == len(output_quantizer_slots(q))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options)
    out = session.run(None, {"input": x[:8].numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), q(x[:8]), rtol=1e-4, atol=1e-4)


def test_bad_placement_is_named():
    with pytest.raises(ValueError, match="activation_placement must be one of inputs, outputs"):
        ae.QuantConfig(activation_placement="edges")
    with pytest.raises(ValueError, match="quantized_inputs.*activation_placement='inputs'"):
        ae.QuantConfig(activation_placement="outputs", quantized_inputs=True)
    # The default quantizes inputs at 4-bit activations only where input quantizers exist.
    assert not ae.QuantConfig(activation_placement="outputs", activation_bits=4).inputs_quantized

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: fx cannot trace it

    with pytest.raises(ValueError, match="activation_placement='outputs' needs a model torch.fx can trace"):
        ae.quantize(Untraceable(), torch.ones(4, 4), ae.QuantConfig(rounding="nearest", progress=False,
                                                                     activation_placement="outputs"))
