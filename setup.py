"""Builds fastforget and its native extension fastforget._C (C++ CPU kernels; CUDA kernels when torch has CUDA).

Environment:
  FASTFORGET_SKIP_CUDA_BUILD=1  build the CPU kernels only, even when torch has CUDA
  FASTFORGET_CPU_ARCH           -march of the C++ kernels (default: native, for the building machine); set it
                                to e.g. x86-64-v2, or empty for the compiler's default, to build for other CPUs
  MAX_JOBS, TORCH_CUDA_ARCH_LIST are honoured by torch.utils.cpp_extension (ninja).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def native_extension():
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("FASTFORGET_SKIP_CUDA_BUILD")
    )
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]  # csrc/*.cpp: any device
    # -fopenmp makes at::parallel_for parallel; the GOMP symbols resolve to the OpenMP runtime torch already
    # loaded (not linked here), so torch.set_num_threads governs our kernels too.
    # -fno-trapping-math lets the compiler vectorise loops with float selects (we never read FP exception flags),
    # -fno-math-errno loops with sqrt (we never read errno);
    # -march (default native: the build is for this machine) lets it use AVX2/AVX-512 where the CPU has them.
    arch = os.environ.get("FASTFORGET_CPU_ARCH", "native")
    extra = {
        "cxx": [
            "-O3",
            "-std=c++17",
            "-fopenmp",
            "-fno-trapping-math",
            "-fno-math-errno",
            *([f"-march={arch}"] if arch else []),
        ]
    }
    if with_cuda:
        # every op's binding; nvcc_check.cu only compile-checks the torch-free kernel headers
        sources += sorted(f for f in glob.glob("csrc/cuda/*.cu") if not f.endswith("nvcc_check.cu"))
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        return CUDAExtension("fastforget._C", sources, extra_compile_args=extra)
    return CppExtension("fastforget._C", sources, extra_compile_args=extra)


setup(
    name="fastforget",
    version="0.1.0",
    description="Fused multi-tensor kernels for EWC, rehearsal, LoRA and gradient protection",
    packages=["fastforget", "fastforget.ops", "fastforget.optim", "fastforget.kernels", "fastforget.demo"],
    package_dir={"fastforget.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
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
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
