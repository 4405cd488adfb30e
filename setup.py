"""Builds fastforget: a pure-Python wheel (py3-none-any) that ships the C++/CUDA sources as package data
(fastforget/_csrc); the kernels are built just in time on first use, against the torch that runs them
(fastforget/_extension.py).

Environment:
  FASTFORGET_BUILD_EXT=1        build the native extension fastforget._C now, into the wheel or in place; needs torch
                                in the build environment: `FASTFORGET_BUILD_EXT=1 pip install --no-build-isolation .`
  FASTFORGET_SKIP_CUDA_BUILD=1  with it: the CPU kernels only, even when torch has CUDA
  FASTFORGET_CPU_ARCH           with it: -march of the C++ kernels (default native, for the building machine); e.g.
                                x86-64-v2, or empty for the compiler's default, to build for other CPUs
  MAX_JOBS, TORCH_CUDA_ARCH_LIST are honoured by torch.utils.cpp_extension (ninja).
"""

import importlib.util
import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load(module_path: str):
    spec = importlib.util.spec_from_file_location(Path(module_path).stem, ROOT / module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ahead_of_time_build():
    """ext_modules and cmdclass of the fastforget._C build, from the same sources and flags as the JIT build."""
    if os.environ.get("FASTFORGET_BUILD_EXT", "0") in ("", "0"):
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build = _load("fastforget/_build.py")
    with_cuda, _ = build.cuda_build_decision()
    sources = [str(p.relative_to(ROOT)) for p in build.sources(ROOT / "csrc", with_cuda)]
    flags = {"cxx": build.cxx_flags(), **({"nvcc": build.nvcc_flags()} if with_cuda else {})}
    extension = (CUDAExtension if with_cuda else CppExtension)(
        "fastforget._C", sources, include_dirs=[str(ROOT / "csrc")], extra_compile_args=flags
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


VERSION = re.search(r'__version__ = "(.+)"', (ROOT / "fastforget/_version.py").read_text()).group(1)
CSRC_PATTERNS = ["*.h", "*.hpp", "*.cpp", "*.cu", "*.cuh"]

setup(
    name="fastforget",
    version=VERSION,
    description="Fused multi-tensor kernels for EWC, rehearsal, LoRA and gradient protection",
    # every package under fastforget/ (a checkout's fastforget/kernels symlink aside), plus the two mapped folders
    packages=[
        *find_packages(include=["fastforget", "fastforget.*"], exclude=["fastforget.kernels*"]),
        "fastforget.kernels",
        "fastforget._csrc",
    ],
    # the repository keeps Triton kernels in kernels/ and C++/CUDA sources in csrc/; installed, they live inside
    # the package (the just-in-time build compiles fastforget/_csrc)
    package_dir={"fastforget.kernels": "kernels", "fastforget._csrc": "csrc"},
    package_data={"fastforget._csrc": [*CSRC_PATTERNS, *(f"**/{p}" for p in CSRC_PATTERNS)]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "ninja"],  # ninja: the just-in-time build of the C++/CUDA kernels
    extras_require={
        "triton": ["triton>=3.6"],
        "peft": ["safetensors"],  # ff.load_peft_adapter of adapter_model.safetensors files
        "demo": ["scikit-learn", "matplotlib", "tqdm"],  # python -m fastforget demo
        "hf": ["transformers>=5.25", "peft>=0.21", "accelerate>=1.16", "safetensors"],  # fastforget.transformers
        "qlora": ["bitsandbytes>=0.50"],  # LoRA over 4-bit / 8-bit quantized bases
        "test": [
            "pytest",
            "pytest-benchmark",
            "pytest-timeout",
            "pytest-xdist",
            "hypothesis",
            "safetensors",
            "scikit-learn",
            "matplotlib",
            "tqdm",
            "transformers>=5.25",
            "peft>=0.21",
            "bitsandbytes>=0.50",
            "accelerate>=1.16",
            "tokenizers",
            "trl",
        ],
    },
    entry_points={"console_scripts": ["fastforget=fastforget.__main__:main"]},
    **ahead_of_time_build(),
)
