import os
import sys

import pytest
import torch

# Run against the source tree when the package was built in place (setup.py build_ext --inplace).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))

import adaround_ext  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available() and adaround_ext.CUDA_COMPILED
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
