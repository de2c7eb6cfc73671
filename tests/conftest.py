import os
import sys

import pytest
import torch

# Run against the source tree when the package was built in place (setup.py build_ext --inplace).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))

import adaround_ext  # noqa: E402,F401
from adaround_ext import testbed  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and adaround_ext.CUDA_COMPILED
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# The Fashion-MNIST subset and the briefly trained resnet18 shared by the pipeline and export tests.
@pytest.fixture(scope="session")
def data():
    train_x, train_y = testbed.fashion_mnist("train")
    test_x, test_y = testbed.fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train_x), generator=g)
    return dict(train=(train_x[idx[:6000]], train_y[idx[:6000]]), calib=train_x[idx[6000:6256]],
                test=(test_x[:2000], test_y[:2000]))


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory):
    """resnet18(num_classes=10) after a short training budget (2 epochs on 6000 images)."""
    torch.manual_seed(0)
    model = testbed.resnet("resnet18", 10)
    testbed.train(model, *data["train"], epochs=2, log=lambda *_: None)
    return model.eval()
