import os
import sys

import pytest
import torch

# Run against the source tree when the package was built in place (setup.py build_ext --inplace).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))

import adaround_ext  # noqa: E402,F401
from adaround_ext import _C  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and adaround_ext.CUDA_COMPILED
# "emulated": CPU tensors, with the CPU ops routed to the host emulation of their CUDA kernels and
# optimize_layer in the form it takes on a GPU (csrc/device/emulation.h).
DEVICES = ["cpu", "emulated",
           pytest.param("cuda", marks=[pytest.mark.cuda,
                                       pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device the test's tensors go on; "emulated" runs the CUDA kernels' code on the CPU."""
    if request.param != "emulated":
        yield request.param
        return
    _C.set_cuda_emulation(True)
    try:
        yield "cpu"
    finally:
        _C.set_cuda_emulation(False)


def cpu_paths(t):
    """Whether optimize_layer takes its CPU-only execution paths for tensors like `t`."""
    return t.is_cpu and not _C.cuda_emulation()


def needs_cuda(test):
    """Marks a test that runs only on a CUDA device (selected by the GPU check with -m cuda)."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


@pytest.fixture(autouse=True, scope="session")
def full_precision_float32():
    """References in float32 are computed without TF32: on a GPU, cuDNN convolutions default to TF32
    (10-bit mantissa), which would fail tight comparisons with the loop (which turns TF32 off) for
    the wrong reason."""
    # The flags PyTorch's own code still reads (torch.export reads them through cudnn.flags()); its
    # per-op settings would make those reads fail.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


# The Fashion-MNIST subset and the briefly trained resnet18 shared by the pipeline and export tests.
@pytest.fixture(scope="session")
def data():
    from adaround_testbed import testbed  # numpy: only the tests that use the data need it

    train_x, train_y = testbed.fashion_mnist("train")
    test_x, test_y = testbed.fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train_x), generator=g)
    return dict(train=(train_x[idx[:6000]], train_y[idx[:6000]]), calib=train_x[idx[6000:6256]],
                test=(test_x[:2000], test_y[:2000]))


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory):
    """resnet18(num_classes=10) after a short training budget (2 epochs on 6000 images)."""
    from adaround_testbed import testbed

    torch.manual_seed(0)
    model = testbed.network("resnet18", 10)
    testbed.train(model, *data["train"], epochs=2, log=lambda *_: None)
    return model.eval()
