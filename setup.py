"""Builds adaround_ext._C with torch.utils.cpp_extension.

CUDA sources are compiled whenever nvcc is found and torch is a CUDA build, with or without a GPU.
Overrides: FORCE_CUDA=1 (fail if CUDA cannot be built), USE_CUDA=0 (CPU only), ADAROUND_REGISTER_ONLY=1
(install without building the extension).
TORCH_CUDA_ARCH_LIST defaults to "9.0" to keep compile time bounded; set it for other GPUs.
"""
import glob
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def use_cuda() -> bool:
    if os.environ.get("USE_CUDA", "1") == "0":
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("FORCE_CUDA", "0") == "1" and not available:
        raise RuntimeError("FORCE_CUDA=1 but nvcc or a CUDA build of torch is missing")
    return available


def cpu_flags() -> list:
    # -fopenmp: at::parallel_for is inline and only runs in parallel when compiled with OpenMP.
    # -fno-trapping-math: nothing here reads floating-point exception flags; it lets the compiler
    # turn selects such as ReLU's into blends (reconstruction_grad ran ~15x slower with branches).
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("ADAROUND_NO_AVX2", "0") != "1":
        # The CPU kernels use ATen's AVX2 vectors (SLEEF exp/log/pow from libtorch_cpu).
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = (rel("csrc/*.cpp") + rel("csrc/loop/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/device/*.cpp")
               + rel("csrc/python/*.cpp"))
    if use_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return CUDAExtension(
            "adaround_ext._C",
            sources + rel("cuda/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("ADAROUND_WITH_CUDA", None)],
            extra_link_args=["-fopenmp"],
            extra_compile_args={
                "cxx": cpu_flags(),
                "nvcc": ["-O3", "--extended-lambda", "--expt-relaxed-constexpr"],
            },
        )
    return CppExtension("adaround_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": cpu_flags()},
                        extra_link_args=["-fopenmp"])


setup(
    name="adaround_ext",
    version="0.1.0",
    description="AdaRound post-training quantization as PyTorch C++/CUDA ops",
    package_dir={"": "python"},
    packages=find_packages("python"),
    # ADAROUND_REGISTER_ONLY=1: an editable install that only registers the package (scripts/bootstrap.sh
    # builds the extension in place first, so that it and later rebuilds share one ninja build directory).
    ext_modules=[] if os.environ.get("ADAROUND_REGISTER_ONLY") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["adaround-quantize-resnet=adaround_testbed.cli:main"]},
    python_requires=">=3.10",
)
