"""Build stripeconv and its compiled extension ``stripeconv._C``.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda) are added when a CUDA
toolkit and a CUDA build of torch are present, or when STRIPECONV_FORCE_CUDA=1; set
STRIPECONV_FORCE_CUDA=0 to skip them. The Triton kernels in kernels/ ship as the
``stripeconv.kernels`` subpackage.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("STRIPECONV_FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    def sources(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))

    cpp = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    if _want_cuda():
        return CUDAExtension(
            "stripeconv._C",
            cpp + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags + ["-DSTRIPECONV_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("stripeconv._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])


packages = find_packages(include=["stripeconv", "stripeconv.*"]) + ["stripeconv.kernels"]

setup(
    packages=packages,
    package_dir={"stripeconv": "stripeconv", "stripeconv.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
