"""optimize_layer's options are defined once (csrc/optimize_options.h, OptimizeOptions' defaults):
the op schema, QuantConfig and the Python wrapper agree, and one check validates them."""
import pytest
import torch

import adaround_ext as ae
from adaround_ext import _C
from adaround_ext.config import LOOP_FIELDS


def schema_defaults():
    schema = torch.ops.adaround.optimize_layer.default._schema
    return {a.name: a.default_value for a in schema.arguments if a.has_default_value()}


def test_quant_config_defaults_are_the_ops():
    config, op = ae.QuantConfig(), schema_defaults()
    for name in LOOP_FIELDS:
        assert getattr(config, name) == op[name], name
        assert type(getattr(config, name)) is type(op[name]), name
    assert config.loop_options() == {name: op[name] for name in LOOP_FIELDS}


def test_the_defaults_are_the_papers():
    """docs/algorithm.md: 10,000 iterations, batch 32, Adam lr 1e-3, lambda 0.01, beta 20 -> 2 after a
    20 % warm start."""
    op = schema_defaults()
    assert (op["iterations"], op["batch_size"], op["lr"], op["reg_lambda"]) == (10000, 32, 1e-3, 0.01)
    assert (op["beta_start"], op["beta_end"], op["warm_start"]) == (20.0, 2.0, 0.2)


def test_wrapper_without_options_runs_the_op_defaults():
    """adaround_ext.optimize_layer with no options equals the op called with every default spelled out."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4, 6, generator=g), torch.randn(64, 6, generator=g)
    scale = w.abs().amax(1) / 7
    args = (w, None, scale, None, -8, 7, 0, x, x @ w.t())
    options = {k: v for k, v in schema_defaults().items() if k not in ("stride", "padding", "dilation", "groups",
                                                                       "transposed", "output_padding")}
    options["iterations"] = 50  # short, the same on both sides
    wrapped = ae.optimize_layer(*args, iterations=50)
    explicit = torch.ops.adaround.optimize_layer(*args, **options)
    torch.testing.assert_close(wrapped.v, explicit[2], rtol=0, atol=0)


@pytest.mark.parametrize("field, value, message", [
    ("iterations", 0, "iterations must be > 0"),
    ("batch_size", -1, "batch_size must be > 0"),
    ("lr", 0.0, "lr must be positive"),
    ("reg_lambda", -0.1, "reg_lambda must be >= 0"),
    ("beta_start", 0.5, "beta_start and beta_end must be finite and >= 1"),
    ("warm_start", 1.0, r"warm_start must be in \[0, 1\)"),
    ("schedule", "step", "schedule must be cosine or linear"),
    ("mode", "fast", "mode must be one of minibatch, exact, auto"),
])
def test_one_check_for_config_and_op(field, value, message):
    """QuantConfig refuses what the op refuses, with the op's message (lr, reg_lambda and beta were not
    checked by QuantConfig before)."""
    with pytest.raises(ValueError, match=message):
        ae.QuantConfig(**{field: value})
    w, x = torch.randn(4, 6), torch.randn(64, 6)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.adaround.optimize_layer(w, None, w.abs().amax(1) / 7, None, -8, 7, 0, x, x @ w.t(),
                                          **{field: value})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="iterationz"):
        _C.check_optimize_options(iterationz=3)


def test_option_of_the_wrong_type_is_named():
    """Was: pybind11's "Unable to cast Python instance of type <class 'str'> to C++ type", naming no option."""
    with pytest.raises(ValueError, match="option iterations must be int64_t, got 'ten'"):
        _C.check_optimize_options(iterations="ten")
