"""Loads fastforget._C, whose import registers the C++/CUDA kernels; remembers why when it cannot."""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from fastforget import _C  # noqa: F401

    LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
    LOAD_ERROR = f"fastforget._C failed to load ({error}); build it with `pip install --no-build-isolation -e .`"
