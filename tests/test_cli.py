"""The main job's command line (adaround_testbed.cli): the Fashion-MNIST default and the ImageNet path
(--data/--weights) on a small ImageFolder with resnet50's bottleneck blocks."""
import re

import pytest
import torch
from PIL import Image

import adaround_ext as ae
from adaround_testbed import cli, testbed
from adaround_ext.folding import fold_batchnorm
from adaround_ext.quantize import execution_order, following_activations
from adaround_ext.scales import init_activation_grid


def run_cli(capsys, *argv):
    cli.main([str(a) for a in argv])
    return capsys.readouterr().out


def printed_accuracies(out):
    """{seed line: (AdaRound, nearest)} and the FP32 accuracy, as the job printed them."""
    fp32 = float(re.search(r"FP32 accuracy: ([\d.]+)%", out).group(1))
    runs = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"\n(.+, seed \d+): AdaRound ([\d.]+)% \(nearest ([\d.]+)%\)", out)}
    return fp32, runs


@pytest.mark.slow  # over 10 s on 2 cores
def test_fashion_mnist_job_prints_what_its_saved_models_score(trained, tmp_path, capsys):
    checkpoint = tmp_path / "fp32.pt"
    torch.save(trained.state_dict(), checkpoint)
    runs = tmp_path / "runs"
    out = run_cli(capsys, "--model-checkpoint", checkpoint, "--out", runs, "--settings", "w4a8,w3-pt",
                  "--iterations", 20, "--samples", 64, "--eval-images", 300, "--no-progress")
    test_x, test_y = testbed.fashion_mnist("test")
    test_x, test_y = test_x[:300], test_y[:300]
    fp32, results = printed_accuracies(out)
    assert fp32 == round(testbed.evaluate(trained, test_x, test_y), 2)
    # Per-tensor settings equalize the model first (--cross-layer-equalization auto).
    assert set(results) == {"W4A8 per-channel, weight-MSE grid, seed 0", "W3A32 per-tensor, min-max grid, CLE, seed 0"}
    for setting, description in (("w4a8", cli.SETTINGS["w4a8"][0]), ("w3-pt", cli.SETTINGS["w3-pt"][0] + ", CLE")):
        # The artifacts reload into a fresh torchvision model that scores what the job printed.
        loaded = ae.load_quantized(testbed.network("resnet18", 10), str(runs / f"resnet18_{setting}_seed0.pt"))
        assert round(testbed.evaluate(loaded, test_x, test_y), 2) == results[f"{description}, seed 0"][0]
        for suffix in (".encodings.json", "_report.png"):
            assert (runs / f"resnet18_{setting}_seed0{suffix}").stat().st_size > 0
    # Nearest rounding of W3 per-tensor min-max weights does not depend on the calibration images.
    nearest = ae.quantize(trained, torch.zeros(1, 3, 32, 32), ae.QuantConfig(
        rounding="nearest", weight_bits=3, per_channel=False, scale_method="minmax", activation_bits=None,
        num_samples=1, device="cpu", progress=False, cross_layer_equalization=True))
    assert results["W3A32 per-tensor, min-max grid, CLE, seed 0"][1] == round(testbed.evaluate(nearest, test_x, test_y), 2)
    table = out[out.rindex("resnet18, 20 iterations/layer"):]
    assert "W4A8 per-channel" in table and "W3A32 per-tensor" in table


@pytest.fixture
def image_folder(tmp_path):
    """Six random RGB images of odd sizes in two class folders (ImageNet val layout)."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "val"
    for c, size in (("n01440764", (40, 56)), ("n01443537", (300, 260))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"img{i}.png")
    return root


@pytest.mark.slow  # over 10 s on 2 cores
def test_imagenet_path_quantizes_resnet50(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    fp32_model = testbed.network("resnet50", 1000).eval()
    weights = tmp_path / "resnet50.pth"
    torch.save(fp32_model.state_dict(), weights)
    runs = tmp_path / "runs"
    out = run_cli(capsys, "--arch", "resnet50", "--data", image_folder, "--weights", weights, "--settings", "w4a8",
                  "--iterations", 4, "--samples", 2, "--batch-size", 1, "--workers", 0, "--out", runs,
                  "--activation-range", "minmax", "--no-progress")
    loader = testbed.imagenet_loader(str(image_folder), workers=0)
    fp32, results = printed_accuracies(out)
    assert fp32 == round(testbed.evaluate(fp32_model, loader), 2)
    loaded = ae.load_quantized(testbed.network("resnet50", 1000), str(runs / "resnet50_w4a8_seed0.pt"))
    assert round(testbed.evaluate(loaded, loader), 2) == results["W4A8 per-channel, weight-MSE grid, seed 0"][0]
    layers = [m for m in loaded.modules() if isinstance(m, ae.QuantizedLayer)]
    assert len(layers) == 54 and all(m.codes.min() >= -8 and m.codes.max() <= 7 for m in layers)  # 53 convs, fc
    # The first layer's input range is the min/max of the two images imagenet_images picks.
    calib = testbed.imagenet_images(str(image_folder), 2, workers=0)
    assert calib.shape == (2, 3, 224, 224)
    scale, zero_point, _, _ = init_activation_grid(calib.min().item(), calib.max().item(), 8)
    assert loaded.conv1.input_quantizer.scale.item() == pytest.approx(scale, rel=1e-6)
    assert loaded.conv1.input_quantizer.zero_point.item() == zero_point


def test_imagenet_evaluation_streams_the_same_accuracy(image_folder):
    model = testbed.network("resnet18", 1000).eval()
    torch.nn.init.zeros_(model.fc.weight)
    with torch.no_grad():
        model.fc.bias.zero_()[0] = 1.0  # always class 0: three of the six images
    assert testbed.evaluate(model, testbed.imagenet_loader(str(image_folder), batch_size=4, workers=0)) == 50.0
    images, labels = map(torch.cat, zip(*testbed.imagenet_loader(str(image_folder), limit=5, workers=0)))
    assert images.shape == (5, 3, 224, 224)
    assert testbed.evaluate(model, images, labels, batch_size=2) == 100.0 * (labels == 0).sum().item() / 5


def test_bottleneck_layers_order_and_activations():
    folded = fold_batchnorm(testbed.network("resnet50", 10).eval())
    order = execution_order(folded, torch.zeros(1, 3, 32, 32))
    assert len(order) == 54 and order[0] == "conv1" and order[-1] == "fc"
    assert order.index("layer1.0.downsample.0") > order.index("layer1.0.conv3")
    acts = following_activations(folded)
    assert acts["layer1.0.conv1"] == "relu" and acts["layer1.0.conv2"] == "relu"
    # conv3 and the downsample feed the residual sum; the ReLU comes after it.
    assert acts["layer1.0.conv3"] == "none" and acts["layer1.0.downsample.0"] == "none"


def test_imagenet_path_bad_input(image_folder, tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(testbed.network("resnet18", 1000).state_dict(), weights)
    with pytest.raises(SystemExit, match="--weights"):
        cli.main(["--data", str(image_folder)])
    with pytest.raises(SystemExit, match="--data .* is not a directory"):
        cli.main(["--data", str(tmp_path / "missing"), "--weights", str(weights)])
    with pytest.raises(SystemExit, match="--calib-data .* is not a directory"):
        cli.main(["--data", str(image_folder), "--calib-data", str(tmp_path / "missing"), "--weights", str(weights)])
    with pytest.raises(SystemExit, match="does not fit torchvision resnet50"):
        cli.main(["--arch", "resnet50", "--data", str(image_folder), "--weights", str(weights)])
    with pytest.raises(SystemExit):
        cli.main(["--settings", "w5"])


def test_asymmetric_weights_flag_gives_zero_point_grids():
    """--asymmetric-weights turns every setting's weight grids unsigned with zero points and says so in
    the setting's label; without it the settings keep their symmetric grids."""
    args = cli.parse_args(["--asymmetric-weights", "--settings", "w2a4,w4a8-paper"])
    for setting in ("w2a4", "w4a8-paper"):
        label, options = cli._setting_options(args, setting)
        assert not ae.QuantConfig(**options, progress=False).symmetric and "asymmetric weights" in label
    label, options = cli._setting_options(cli.parse_args(["--settings", "w2a4"]), "w2a4")
    assert ae.QuantConfig(**options, progress=False).symmetric and "asymmetric" not in label
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    _, options = cli._setting_options(args, "w2a4")
    options.update(iterations=2, num_samples=8, batch_size=4, device="cpu", progress=False)
    q = ae.quantize(model, torch.randn(8, 3, 6, 6), ae.QuantConfig(**options))
    layers = [m for m in q.modules() if isinstance(m, ae.QuantizedLayer)]
    assert len(layers) == 2 and all((m.quant_min, m.quant_max) == (0, 3) and (m.zero_point > 0).all()
                                    for m in layers)
