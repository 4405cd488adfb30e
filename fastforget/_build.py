"""What the native kernels are built from and with: one list of sources and flags for both builds.

The just-in-time build (``fastforget/_extension.py``, the default) and the ahead-of-time one (``setup.py`` with
``FASTFORGET_BUILD_EXT=1``) read them here. Importing this module imports nothing heavy (setup.py loads it by path,
before torch's build helpers): only the functions that need torch import it.

The C++ standard (``-std=c++20`` for torch 2.13) and the other flags every extension needs are added by
``torch.utils.cpp_extension`` itself, for the torch that builds; we add only our own.
"""

import os
from pathlib import Path

SKIP_CUDA_ENV = "FASTFORGET_SKIP_CUDA_BUILD"
CPU_ARCH_ENV = "FASTFORGET_CPU_ARCH"


def source_root() -> Path:
    """The kernels' sources: ``fastforget/_csrc`` in an installed wheel, the checkout's ``csrc/`` otherwise."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "extension.cpp").is_file():
            return candidate
    missing = f"neither {package / '_csrc'} nor {package.parent / 'csrc'}"
    raise FileNotFoundError(f"fastforget's C++ sources are missing ({missing})")


def sources(root: Path, with_cuda: bool) -> list[Path]:
    """csrc/*.cpp (any device) and csrc/cpu/*.cpp; with CUDA, every op's binding in csrc/cuda/*.cu (nvcc_check.cu
    only compile-checks the torch-free kernel headers and is not linked)."""
    found = sorted(root.glob("*.cpp")) + sorted(root.glob("cpu/*.cpp"))
    if with_cuda:
        found += sorted(p for p in root.glob("cuda/*.cu") if p.name != "nvcc_check.cu")
    return found


def hashed_files(root: Path) -> list[Path]:
    """Every file a build reads from the source tree (sources and headers, any sub-folder but csrc/emu: the CUDA
    emulator is built by its tests, never into the extension)."""
    suffixes = {".cpp", ".cu", ".h", ".hpp", ".cuh"}
    return sorted(
        p for p in root.rglob("*") if p.suffix in suffixes and p.is_file() and "emu" not in p.relative_to(root).parts
    )


def cpu_arch() -> str:
    """The -march of the C++ kernels: native (the building machine: AVX2/AVX-512 where it has them) unless
    FASTFORGET_CPU_ARCH says otherwise (e.g. x86-64-v2; empty for the compiler's default)."""
    return os.environ.get(CPU_ARCH_ENV, "native")


def cxx_flags() -> list[str]:
    # -fopenmp makes at::parallel_for parallel; the GOMP symbols resolve to the OpenMP runtime torch already
    # loaded (not linked here), so torch.set_num_threads governs our kernels too.
    # -fno-trapping-math lets the compiler vectorise loops with float selects (we never read FP exception flags),
    # -fno-math-errno loops with sqrt (we never read errno).
    arch = cpu_arch()
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *([f"-march={arch}"] if arch else [])]


def nvcc_flags() -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr"]


def find_nvcc() -> str | None:
    """nvcc's path, looked up as torch.utils.cpp_extension does (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda),
    without importing it (it imports setuptools)."""
    import shutil

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.isfile(p)), None)


def cuda_build_decision() -> tuple[bool, str]:
    """(whether to build the CUDA kernels, why or why not). CUDA needs a torch with CUDA, nvcc, and an architecture
    to compile for: the GPUs present, or TORCH_CUDA_ARCH_LIST."""
    import torch

    if os.environ.get(SKIP_CUDA_ENV, "0") not in ("", "0"):
        return False, f"{SKIP_CUDA_ENV} is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if find_nvcc() is None:
        return False, "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return False, "no GPU to build for and TORCH_CUDA_ARCH_LIST is unset"
    return True, "torch has CUDA, nvcc and a GPU or TORCH_CUDA_ARCH_LIST are present"
