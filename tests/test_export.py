"""ONNX QDQ export checked by onnxruntime, and the per-layer report PNG."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import adaround_ext as ae
from adaround_testbed import testbed
from adaround_ext.onnx_export import export_onnx, onnx_weight_codes
from adaround_ext.plots import report_figure, save_report_plot

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SHORT = dict(iterations=20, batch_size=16, num_samples=64, progress=False, device="cpu")


@pytest.fixture(scope="module")
def images(data):
    return data["test"][0][:256]


@pytest.fixture(scope="module")
def resnet_w4a8(trained, data):
    """The briefly trained resnet18 at W4A8 with 8-bit first and last layers (a short schedule)."""
    config = ae.QuantConfig(weight_bits=4, activation_bits=8, first_layer_bits=8, last_layer_bits=8, **SHORT)
    return ae.quantize(trained, data["calib"], config)


@pytest.fixture(scope="module")
def small_asymmetric():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5)).eval()
    config = ae.QuantConfig(weight_bits=3, activation_bits=8, per_channel=False, symmetric=False,
                            scale_method="minmax", **SHORT)
    return ae.quantize(model, torch.randn(64, 3, 8, 8), config), torch.randn(32, 3, 8, 8)


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, ae.QuantizedLayer)}


def run_onnx(path, x, optimize=True):
    options = ort.SessionOptions()
    if not optimize:  # the graph's own arithmetic, without ORT's fused integer kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("opset, low_bit_type", [(21, "INT4"), (20, "INT8")])
def test_onnx_weights_decode_to_the_same_codes(resnet_w4a8, images, tmp_path, opset, low_bit_type):
    path = tmp_path / "model.onnx"
    export_onnx(resnet_w4a8, images[:2], str(path), opset=opset)
    proto = onnx.load(str(path))
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer}
    codes = onnx_weight_codes(str(path))
    layers = quantized_layers(resnet_w4a8)
    assert set(codes) == set(layers)
    for name, layer in layers.items():
        np.testing.assert_array_equal(codes[name], layer.codes.numpy().astype(np.int32), err_msg=name)
        assert types[f"{name}.codes"] == ("INT8" if layer.bits == 8 else low_bit_type), name
    # Every Conv/Gemm reads its input through a Q->DQ pair and its weight through a DQ of the codes.
    producer = {out: n for n in proto.graph.node for out in n.output}
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == len(layers)
    for node in compute:
        act, weight = producer[node.input[0]], producer[node.input[1]]
        assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear"
        assert weight.op_type == "DequantizeLinear" and weight.input[0].endswith(".codes")


def test_onnx_layers_compute_the_same_as_pytorch(resnet_w4a8, images, tmp_path):
    """Each quantized layer alone, fed with its real input: the QDQ graph's arithmetic equals ours."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in quantized_layers(resnet_w4a8).items()]
    with torch.no_grad():
        resnet_w4a8(images[:16])
    for h in hooks:
        h.remove()
    for name in ("conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"):
        layer = resnet_w4a8.get_submodule(name)
        wrapper = nn.Sequential(layer)
        path = tmp_path / f"{name}.onnx"
        export_onnx(wrapper, inputs[name][:2], str(path))
        with torch.no_grad():
            expected = wrapper(inputs[name]).numpy()
        got = run_onnx(path, inputs[name], optimize=False)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)


def test_onnx_model_matches_the_fake_quant_model(resnet_w4a8, images, tmp_path):
    """Whole network under onnxruntime's default (integer-fused) execution. The stated tolerance:
    logits within 2% of their largest magnitude, the same class for >= 97% of the images. Exact
    equality is not expected: a 1e-6 difference in a conv output moves an activation across a rounding
    boundary now and then, and ORT's QLinearConv rounds the bias into int32."""
    path = tmp_path / "model.onnx"
    export_onnx(resnet_w4a8, images[:2], str(path))
    with torch.no_grad():
        expected = resnet_w4a8(images).numpy()
    got = run_onnx(path, images)
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.97


def test_onnx_asymmetric_per_tensor_uses_uint4(small_asymmetric, tmp_path):
    model, x = small_asymmetric
    path = tmp_path / "small.onnx"
    export_onnx(model, x[:2], str(path))
    proto = onnx.load(str(path))
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer}
    assert types["0.codes"] == "UINT4" and types["3.codes"] == "UINT4"
    codes = onnx_weight_codes(str(path))
    for name, layer in quantized_layers(model).items():
        np.testing.assert_array_equal(codes[name], layer.codes.numpy().astype(np.int32))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x, optimize=False), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [21, 20])
def test_onnx_transposed_convolution(tmp_path, opset):
    """A ConvTranspose2d with its per-channel weight grid on axis 1 becomes ConvTranspose <- DQ(axis=1)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU()).eval()
    config = ae.QuantConfig(weight_bits=4, activation_bits=8, **dict(SHORT, batch_size=8))
    q = ae.quantize(model, torch.randn(64, 6, 5, 5), config)
    path = tmp_path / "up.onnx"
    x = torch.randn(16, 6, 5, 5)
    export_onnx(q, x[:2], str(path), opset=opset)
    proto = onnx.load(str(path))
    [node] = [n for n in proto.graph.node if n.op_type == "ConvTranspose"]
    [dq] = [n for n in proto.graph.node if node.input[1] in n.output]
    assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute}.get("axis") == 1
    np.testing.assert_array_equal(onnx_weight_codes(str(path))["0"], q[0].codes.numpy().astype(np.int32))
    with torch.no_grad():
        expected = q(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x, optimize=False), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_onnx_bad_input(small_asymmetric, tmp_path):
    model, x = small_asymmetric
    with pytest.raises(ValueError, match="directory"):
        export_onnx(model, x[:2], str(tmp_path / "missing" / "m.onnx"))
    with pytest.raises(ValueError, match="no QuantizedLayer"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, x[:2], str(tmp_path / "m.onnx"), opset=11)


def test_onnx_rejects_activation_grids_it_cannot_express(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    config = ae.QuantConfig(weight_bits=4, activation_bits=6, **SHORT)
    q = ae.quantize(model, torch.randn(64, 4), config)
    with pytest.raises(ValueError, match=r"layer '0'.*8-bit activation"):
        export_onnx(q, torch.randn(2, 4), str(tmp_path / "m.onnx"))


def test_report_png_is_drawn_from_the_run(resnet_w4a8, tmp_path):
    report = resnet_w4a8.adaround_report
    path = tmp_path / "report.png"
    fig = save_report_plot(report, str(path), title="test run")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(path)).shape
    assert height > 500 and width > 500
    err_ax, undecided_ax, updown_ax, curves_ax = fig.axes
    heights = [p.get_height() for p in err_ax.patches]
    n = len(report.layers)
    assert heights[:n] == pytest.approx([r.nearest_error for r in report.layers])
    assert heights[n:] == pytest.approx([r.adaround_error for r in report.layers])
    assert [p.get_height() for p in undecided_ax.patches] == pytest.approx(
        [r.undecided_fraction for r in report.layers])
    assert [p.get_height() for p in updown_ax.patches][:n] == pytest.approx(
        [r.rounded_up_fraction for r in report.layers])
    assert len(curves_ax.lines) == sum(len(r.loss_curve) > 1 for r in report.layers) > 0
    np.testing.assert_allclose(curves_ax.lines[0].get_ydata(), report.layers[0].loss_curve)


def test_report_png_bad_input(resnet_w4a8, tmp_path):
    with pytest.raises(ValueError, match="directory"):
        save_report_plot(resnet_w4a8.adaround_report, str(tmp_path / "missing" / "r.png"))
    with pytest.raises(ValueError, match="no layers"):
        report_figure(ae.QuantizationReport())
