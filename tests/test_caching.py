"""Layer caches: the one-pass graph walk gives exactly what rerunning each layer's prefix gives, and
make_layer_caches falls back to the prefix reruns where the walk cannot be used."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaround_ext as ae
from adaround_ext import caching
from adaround_ext.caching import GraphWalkCaches, PrefixCaches, make_layer_caches, walk_bytes, walkable_graph
from adaround_ext.folding import fold_batchnorm
from adaround_ext.modules import QuantizedLayer, geometry, layer_kind, set_submodule
from adaround_ext.quantize import execution_order, following_activations

CPU = torch.device("cpu")


class Branchy(nn.Module):
    """A layer input read by two layers, an in-place ReLU over a layer output, a parameter read
    directly (get_attr), functional ops and tensor methods."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(8, 8, 1)
        self.gain = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = self.relu(self.conv_a(x))
        y = F.relu(self.conv_b(a) + self.conv_c(a) * self.gain).mean((2, 3))
        return self.fc(y.view(y.size(0), -1))


def nearest_layer(module, bits=4):
    """A QuantizedLayer with round-to-nearest codes: what the walk finds in place of a finished layer."""
    w = module.weight.detach()
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax() / top
    codes = torch.clamp(torch.round(w / scale), -top - 1, top).to(torch.int8)
    return QuantizedLayer(layer_kind(module), codes, scale.reshape(()), None, -top - 1, top, None,
                          bias=module.bias, **geometry(module))


def assert_same_caches(model, samples, asymmetric, device=CPU):
    layers = execution_order(model, samples[:2].to(device))
    activations = following_activations(model)
    config = ae.QuantConfig(asymmetric_reconstruction=asymmetric, progress=False)
    q_prefix, q_walk = copy.deepcopy(model), copy.deepcopy(model)
    prefix = PrefixCaches(q_prefix, model, samples, config, device)
    walk = GraphWalkCaches(q_walk, model, samples, config, device, walkable_graph(model, layers))
    for name in layers:
        expected = prefix.build(name, activations.get(name, "none"))
        got = walk.build(name, activations.get(name, "none"))
        for e, g in zip(expected, got):
            assert torch.equal(e, g), name
        # The layer is finished: both partly quantized models now hold its rounded weights.
        for q in (q_prefix, q_walk):
            set_submodule(q, name, nearest_layer(model.get_submodule(name)).to(device))
    return layers


@pytest.mark.slow  # over 10 s on 2 cores
def test_walk_gives_the_prefix_caches_on_resnet18(trained, data):
    model = fold_batchnorm(copy.deepcopy(trained))
    samples = torch.cat([data["calib"], data["calib"][:44]])  # 300: two full chunks of 128 and a shorter one
    layers = assert_same_caches(model, samples, asymmetric=True)
    assert len(layers) == 21


@pytest.mark.parametrize("asymmetric", [True, False])
def test_walk_gives_the_prefix_caches_on_branches_and_in_place_ops(asymmetric, device):
    torch.manual_seed(0)
    device = torch.device(device)
    layers = assert_same_caches(Branchy().eval().to(device), torch.randn(140, 3, 6, 6), asymmetric, device)
    assert layers == ["conv_a", "conv_b", "conv_c", "fc"]


def test_layers_must_be_asked_for_in_order():
    torch.manual_seed(0)
    model = Branchy().eval()
    layers = execution_order(model, torch.randn(2, 3, 6, 6))
    walk = GraphWalkCaches(copy.deepcopy(model), model, torch.randn(4, 3, 6, 6), ae.QuantConfig(progress=False),
                           CPU, walkable_graph(model, layers))
    walk.build("conv_b", "none")
    with pytest.raises(RuntimeError, match="conv_a was asked for after the walk passed it"):
        walk.build("conv_a", "relu")


def test_walk_bytes_counts_the_values_kept():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 16))
    graph = walkable_graph(model, ["0", "2"])
    # Peak while the second Linear runs: its 8-float input (the ReLU wrote over the first Linear's
    # output, so it is one tensor) and its 16-float output; the 4-float model input is freed by then.
    assert walk_bytes(model, graph, torch.randn(10, 4), CPU) == (8 + 16) * 4


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("model,budget,expected", [
    (Branchy(), None, "graph walk"),
    (Branchy(), 0, "prefix reruns"),  # the walk's live values do not fit
    (DataDependent(), None, "prefix reruns"),  # fx cannot trace it
    (CalledTwice(), None, "prefix reruns"),  # which call's input would be the cache is not one value
])
def test_strategy_choice(model, budget, expected):
    samples = torch.randn(8, 3, 6, 6) if isinstance(model, Branchy) else torch.randn(8, 4)
    layers = execution_order(model, samples[:2])
    caches = make_layer_caches(copy.deepcopy(model), model, samples, ae.QuantConfig(progress=False), CPU, layers,
                               memory_budget=budget)
    assert caches.strategy == expected


def test_quantize_gives_the_same_model_either_way(monkeypatch):
    torch.manual_seed(0)
    model, samples = Branchy().eval(), torch.randn(160, 3, 6, 6)
    config = ae.QuantConfig(iterations=60, batch_size=16, num_samples=160, progress=False, device="cpu",
                            quantized_inputs=True)  # each layer's input quantizer set during the walk
    walked = ae.quantize(model, samples, config)
    monkeypatch.setattr(caching, "WALK_MEMORY_SHARE", 0.0)
    rerun = ae.quantize(model, samples, config)
    assert walked.adaround_report.cache_strategy == "graph walk"
    assert rerun.adaround_report.cache_strategy == "prefix reruns"
    for a, b in zip(walked.adaround_report.layers, rerun.adaround_report.layers):
        assert a.adaround_error == b.adaround_error, a.name
    torch.testing.assert_close(walked(samples), rerun(samples), rtol=0, atol=0)
