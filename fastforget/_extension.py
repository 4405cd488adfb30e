"""Loads fastforget's native kernels (C++ on the CPU key, CUDA where built), building them just in time.

Where the kernels come from, in order:

1. ``fastforget._C``, built with the package ahead of time (``FASTFORGET_BUILD_EXT=1 pip install
   --no-build-isolation .``, or the Makefile's in-place build);
2. a just-in-time build in the cache folder made earlier for this fastforget, torch (version, C++ ABI), CUDA and
   CPU, from these sources: loading it at import costs one ``dlopen``;
3. else nothing at import: the first op that would run on the ``cpu`` or ``cuda`` backend builds it
   (:func:`ensure_built`; ``python -m fastforget build`` does it ahead of time) with ``torch.utils.cpp_extension``
   and ninja, under a file lock (the ranks of a DDP job build once and all load that build).

When the kernels cannot be loaded or built, :data:`LOAD_ERROR` says why and how to fix it; ``dispatch`` then runs
every op on the Triton or reference backend and warns once. Nothing here raises at import.

Environment: ``FASTFORGET_CACHE`` (the cache folder; default ``$XDG_CACHE_HOME/fastforget`` or
``~/.cache/fastforget``), ``FASTFORGET_JIT=0`` (never build or load a just-in-time build), ``CXX``, ``MAX_JOBS``,
``TORCH_CUDA_ARCH_LIST``, ``FASTFORGET_CPU_ARCH``, ``FASTFORGET_SKIP_CUDA_BUILD`` (see ``fastforget/_build.py``).
"""

import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch  # loads libc10/libtorch, which the kernels link against

from fastforget import _build
from fastforget._version import __version__

JIT_ENV = "FASTFORGET_JIT"
CACHE_ENV = "FASTFORGET_CACHE"
LIBRARY = "fastforget_C"  # the just-in-time build's file name: fastforget_C.so
STAMP = "build.json"  # written after a complete build; its presence is what makes a build usable

LOAD_ERROR: str | None = None  # why the native kernels cannot run here; None when loaded or buildable
LOADED_FROM: str | None = None  # the shared library that registered the kernels
CUDA_DECISION: tuple[bool, str] | None = None  # whether the just-in-time build has CUDA kernels, and why
_build_tried = False


class BuildError(RuntimeError):
    """The kernels could not be built; the message says why and how to fix it."""


@dataclass(frozen=True)
class BuildSpec:
    root: Path  # the C++/CUDA sources
    sources: tuple[Path, ...]
    with_cuda: bool
    cxx_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    directory: Path  # the cache entry of this fastforget/torch/CUDA/CPU/sources combination

    @property
    def library(self) -> Path:
        return self.directory / f"{LIBRARY}.so"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastforget"


def jit_enabled() -> bool:
    return os.environ.get(JIT_ENV, "1") != "0"


def _cpu_tag(arch: str) -> str:
    """The CPU a build is for: with -march=native, a hash of this CPU's feature flags (a cache folder shared
    between machines, e.g. an NFS home, must not hand one CPU's build to another)."""
    machine = platform.machine() or "unknown"
    if arch != "native":
        return f"{machine}-{arch or 'default'}"
    features = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                features = line
                break
    except OSError:
        pass
    return f"{machine}-native-{hashlib.sha256(features.encode()).hexdigest()[:8]}"


def _cuda_tag(with_cuda: bool) -> str:
    if not with_cuda:
        return "nocuda"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ",".join(
        sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    )
    return f"cu{torch.version.cuda}-sm{archs.replace(' ', '_').replace(';', '_').replace(',', '_')}"


def build_spec() -> BuildSpec:
    """What to build, and the cache folder named after everything the build depends on."""
    global CUDA_DECISION
    root = _build.source_root()
    CUDA_DECISION = CUDA_DECISION or _build.cuda_build_decision()
    with_cuda = CUDA_DECISION[0]
    sources = tuple(_build.sources(root, with_cuda))
    cxx, nvcc = tuple(_build.cxx_flags()), tuple(_build.nvcc_flags())
    digest = hashlib.sha256(repr((cxx, nvcc, with_cuda, [p.name for p in sources])).encode())
    for path in _build.hashed_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    name = "_".join(
        [
            f"fastforget-{__version__}",
            f"torch-{torch.__version__}-cxx11abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            _cuda_tag(with_cuda),
            _cpu_tag(_build.cpu_arch()),
            digest.hexdigest()[:12],
        ]
    )
    return BuildSpec(root, sources, with_cuda, cxx, nvcc, cache_root() / "extensions" / name)


def _load(library: Path | str) -> None:
    global LOADED_FROM, LOAD_ERROR
    torch.ops.load_library(str(library))  # runs the kernels' TORCH_LIBRARY_IMPL registrations
    LOADED_FROM, LOAD_ERROR = str(library), None


def _how_to_fix() -> str:
    return "fix that and rerun, or run `python -m fastforget build` to see the build"


def _check_tools(spec: BuildSpec) -> None:
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler: {compiler!r} is not on PATH (install g++ or clang++, or set CXX)")
    if not is_ninja_available():
        raise BuildError("ninja is not installed (pip install ninja)")
    try:
        spec.directory.mkdir(parents=True, exist_ok=True)
        probe = spec.directory / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise BuildError(
            f"the cache folder {spec.directory} is not writable ({error.strerror or error}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from None


class _Progress:
    """One line when the build starts; on a terminal, the objects compiled so far and the seconds elapsed."""

    def __init__(self, spec: BuildSpec):
        self.spec, self.start, self.done = spec, time.monotonic(), threading.Event()
        self.tty = sys.stderr.isatty()
        what = "CPU and CUDA" if spec.with_cuda else "CPU"
        minutes = "a few minutes" if spec.with_cuda else "1-3 min"
        print(
            f"fastforget: building the {what} kernels for torch {torch.__version__} (first use, {minutes}) "
            f"in {spec.directory}",
            file=sys.stderr,
            flush=True,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        if self.tty:
            self.thread.start()

    def _run(self):
        while not self.done.wait(1.0):
            built = len(list(self.spec.directory.glob("*.o")))
            elapsed = time.monotonic() - self.start
            line = f"\r  [{built}/{len(self.spec.sources)} compiled] {elapsed:.0f} s"
            print(line, end="", file=sys.stderr, flush=True)

    def finish(self, ok: bool):
        self.done.set()
        if self.tty:
            self.thread.join()
            print(file=sys.stderr)
        if ok:
            elapsed = time.monotonic() - self.start
            print(f"fastforget: built in {elapsed:.0f} s: {self.spec.library}", file=sys.stderr, flush=True)


def _compile(spec: BuildSpec) -> None:
    from torch.utils import cpp_extension

    (spec.directory / "lock").unlink(missing_ok=True)  # torch's own lock, left by a killed build; ours is held
    progress = _Progress(spec)
    started = time.time()
    try:
        cpp_extension.load(
            name=LIBRARY,
            sources=[str(s) for s in spec.sources],
            extra_cflags=list(spec.cxx_flags),
            extra_cuda_cflags=list(spec.nvcc_flags),
            extra_include_paths=[str(spec.root)],
            build_directory=str(spec.directory),
            with_cuda=spec.with_cuda,
            is_python_module=False,  # load via torch.ops.load_library: the kernels register themselves
            verbose=False,
        )
    except Exception as error:  # the compiler's output is in the message
        progress.finish(ok=False)
        log = spec.directory / "build.log"
        log.write_text(f"{type(error).__name__}: {error}\n")
        last = next((line for line in reversed(str(error).splitlines()) if line.strip()), type(error).__name__)
        raise BuildError(f"building the C++ kernels failed ({last.strip()[:200]}; full log: {log})") from None
    progress.finish(ok=True)
    stamp = {"library": spec.library.name, "torch": torch.__version__, "seconds": round(time.time() - started, 1)}
    (spec.directory / STAMP).write_text(json.dumps(stamp) + "\n")


def build() -> Path:
    """Builds the kernels into the cache (once: a build that exists is reused) and loads them; returns the library.
    Raises BuildError saying why it cannot."""
    global LOADED_FROM, LOAD_ERROR
    from filelock import FileLock  # a dependency of torch

    spec = build_spec()
    if not spec.library.exists() or not (spec.directory / STAMP).exists():
        _check_tools(spec)
        lock = FileLock(str(spec.directory / ".fastforget.lock"))
        try:
            lock.acquire(timeout=0)
        except TimeoutError:
            print(f"fastforget: waiting for another process building the kernels in {spec.directory}", file=sys.stderr)
            lock.acquire()
        try:
            if not (spec.directory / STAMP).exists():  # the process that held the lock may have built it
                _compile(spec)  # cpp_extension.load also loads the library into this process
                LOADED_FROM, LOAD_ERROR = str(spec.library), None
        finally:
            lock.release()
    if LOADED_FROM != str(spec.library):
        _load(spec.library)
    return spec.library


def ensure_built() -> str | None:
    """Builds and loads the kernels unless loaded already (tried once per process); the reason when they cannot."""
    global _build_tried, LOAD_ERROR
    if LOADED_FROM or LOAD_ERROR or _build_tried:
        return LOAD_ERROR
    _build_tried = True
    try:
        build()
    except Exception as error:  # a build must never crash the op that asked for it: it falls back instead
        LOAD_ERROR = f"fastforget's C++ kernels are not built: {error}; {_how_to_fix()}"
    return LOAD_ERROR


def status() -> str:
    """Where the kernels come from, or why they cannot run: for available_backends() and the command line."""
    if LOAD_ERROR:
        return LOAD_ERROR
    if LOADED_FROM:
        return f"kernels from {LOADED_FROM}"
    folder = cache_root() / "extensions"
    return f"the kernels are built on first use, into {folder} (or now: python -m fastforget build)"


def _load_at_import() -> None:
    global LOAD_ERROR, LOADED_FROM
    try:
        from fastforget import _C

        LOADED_FROM = _C.__file__
        return
    except ImportError as error:  # not built ahead of time (the usual case), or built against another torch
        ahead_of_time_error = error
    if not jit_enabled():
        LOAD_ERROR = (
            f"fastforget._C failed to load ({ahead_of_time_error}) and {JIT_ENV}=0 turns the just-in-time build off: "
            f"unset it, or build with `python -m fastforget build`"
        )
        return
    try:
        spec = build_spec()
        if (spec.directory / STAMP).exists() and spec.library.exists():
            _load(spec.library)
    except Exception as error:  # a broken cache entry or missing sources: say so, never fail the import
        LOAD_ERROR = f"fastforget's C++ kernels cannot be loaded: {error}; delete {cache_root() / 'extensions'}"


_load_at_import()
