"""Helpers shared by every op's benchmark: sizes, device, timing, the add-bandwidth baseline, the result table, and
the pytest tests and CLI table of a bandwidth-bound op built from its variant factories.

Environment:
  FF_BENCH_SCALE  float (default 1.0): scales every dimension of the GPT-2-small tensor list, so the element
                  count scales about as scale**2 (scale 1.0 is ~124M elements in 148 tensors).
  FF_BENCH_SMOKE  "1": tiny sizes (scale SMOKE_SCALE) and few repeats, so that every benchmark runs in seconds
                  (CI runs ``FF_BENCH_SMOKE=1 pytest bench/ --benchmark-disable``). Overrides FF_BENCH_SCALE.
  FF_BENCH_RESULTS  folder of the JSON results (default bench/results; empty: write none).

Every table a benchmark's CLI prints (``python bench/<script>.py``, full size) is also written, with the machine,
torch version and date, to ``bench/results/<script>.json``; ``python bench/render_docs.py`` then regenerates the
docs' tables from those files.

Bytes moved are the op's minimum memory traffic (each tensor it must read or write counted once), not the
traffic a given implementation happens to cause; GB/s = bytes_moved / median seconds, and the fraction is that
over the GB/s of ``torch.add(b, c, alpha=s, out=a)`` (read b and c, write a: 12 B/element in fp32) measured in
the same run over the same element count. The CLI tables also give the fraction of ``b.copy_(a)``'s GB/s (read a,
write b: 8 B/element), measured in the same run.
"""

import argparse
import atexit
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastforget as ff
from fastforget.testing import import_installed_kernels_package

import_installed_kernels_package()  # whoever imported `bench` put the repository root, and its kernels/, on sys.path

SMOKE_SCALE = 0.02
FP32_BYTES = 4
ADD_BYTES_PER_ELEMENT = 3 * FP32_BYTES
COPY_BYTES_PER_ELEMENT = 2 * FP32_BYTES
# Set to a list to collect every table print_table prints, as {"headers", "rows"} (bench/gpu_tables.py does).
RECORDED_TABLES: list[dict] | None = None
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "FF_BENCH_RESULTS"
_RESULT_TABLES: list[dict] = []  # the tables this CLI run printed, written to its results file at exit
# the backends that make sense on each device type; `ff.available_backends()` says which of them are built
DEVICE_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def smoke_mode() -> bool:
    return os.environ.get("FF_BENCH_SMOKE", "0") not in ("", "0")


def bench_scale() -> float:
    return SMOKE_SCALE if smoke_mode() else float(os.environ.get("FF_BENCH_SCALE", "1.0"))


def default_repeats() -> int:
    return 3 if smoke_mode() else 10


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpt2_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (HF layout: Conv1D weights are (in, out)), every dimension times scale."""

    def dims(*sizes: int) -> tuple[int, ...]:
        return tuple(max(1, round(size * scale)) for size in sizes)

    vocab, context, width, layers = 50257, 1024, 768, 12
    block = [
        dims(width),
        dims(width),  # ln_1 weight, bias
        dims(width, 3 * width),
        dims(3 * width),  # attn.c_attn
        dims(width, width),
        dims(width),  # attn.c_proj
        dims(width),
        dims(width),  # ln_2
        dims(width, 4 * width),
        dims(4 * width),  # mlp.c_fc
        dims(4 * width, width),
        dims(width),  # mlp.c_proj
    ]
    return [dims(vocab, width), dims(context, width), *block * layers, dims(width), dims(width)]


def gpt2_tensors(scale: float, device: torch.device, dtype=torch.float32) -> list[torch.Tensor]:
    """One standard-normal tensor per GPT-2 parameter."""
    return [torch.randn(shape, device=device, dtype=dtype) for shape in gpt2_shapes(scale)]


def gpt2_numel(scale: float = 1.0) -> int:
    return sum(math.prod(shape) for shape in gpt2_shapes(scale))


def device_backends(device: torch.device) -> tuple[str, ...]:
    """Backends benchmarked on ``device``; in smoke mode on the CPU also Triton's interpreter, so it cannot rot."""
    if device.type == "cpu" and smoke_mode():
        return DEVICE_BACKENDS["cpu"] + ("triton",)
    return DEVICE_BACKENDS[device.type]


def backend_skip_reason(name: str, available: dict, device: torch.device) -> str | None:
    """Why backend ``name`` can't be benchmarked on ``device``, or None; ``available`` is ff.available_backends()."""
    if name not in device_backends(device):
        return f"the {name} backend is not benchmarked on {device.type}"
    if name not in available:
        return f"ff.available_backends() does not report {name}"
    return None if available[name].available else (available[name].reason or f"{name} is unavailable")


def usable_backends(available: dict, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends to benchmark on ``device`` and, for the others meant for it, why they are skipped."""
    reasons = {name: backend_skip_reason(name, available, device) for name in device_backends(device)}
    return (
        [name for name, reason in reasons.items() if reason is None],
        {name: reason for name, reason in reasons.items() if reason is not None},
    )


def require_backend(name: str, available: dict, device: torch.device) -> None:
    """In a benchmark test: skip it unless backend ``name`` can be benchmarked on ``device``."""
    reason = backend_skip_reason(name, available, device)
    if reason is not None:
        pytest.skip(reason)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` runs, after ``warmup`` untimed runs."""
    return time_interleaved([fn], repeats, warmup)[0]


def time_interleaved(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time (ms) of each of ``fns``, timed in rounds (one run of each per round) so that a slow spell
    of a shared machine hits every function alike and their ratios stay meaningful."""
    return [statistics.median(times) for times in interleaved_samples(fns, repeats, warmup)]


def interleaved_samples(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Wall times (ms) of each of ``fns`` in each of ``repeats`` rounds (one run of each per round), after
    ``warmup`` untimed runs of each: ``median_ratio`` of two of them compares within rounds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            start = time.perf_counter()
            fn()
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return samples


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator[i] / denominator[i] (samples of ``interleaved_samples``): a slow spell
    that hits one round cancels out, which the ratio of two medians does not guarantee."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def time_first_call_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call, e.g. the first call of a torch.compile'd function (compile + one run)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return (time.perf_counter() - start) * 1e3


@dataclass
class Variant:
    name: str
    backend: str
    fn: Callable[[], object]  # one full run of the op; the inputs are bound in the closure
    bytes_moved: int
    compile_ms: float | None = None  # a compiled variant's first call (less on a warm Inductor on-disk cache)
    state_bytes: int | None = None  # persistent state the variant keeps between runs (e.g. a protector's history)


def alternate(*calls: Callable[[], object]) -> Callable[[], object]:
    """A function that runs ``calls[0]``, ``calls[1]``, ... in turn, one per call: e.g. an in-place op applied
    with factors f, then 1/f, so that any number of repeated runs keeps its inputs bounded."""
    turns = itertools.cycle(calls)
    return lambda: next(turns)()


def tensor_bytes(tensors) -> int:
    """Bytes held by the elements of ``tensors`` (each counted in full, views included)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def gbps(bytes_moved: int, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def add_baseline(numel: int, device: torch.device) -> Variant:
    """``torch.add(b, c, alpha=s, out=a)`` over ``numel`` fp32 elements: the reachable memory bandwidth."""
    b, c = torch.rand(numel, device=device), torch.rand(numel, device=device)
    a = torch.empty_like(b)
    return Variant(
        "bandwidth_baseline", "torch.add", lambda: torch.add(b, c, alpha=0.5, out=a), ADD_BYTES_PER_ELEMENT * numel
    )


def copy_baseline(numel: int, device: torch.device) -> Variant:
    """``b.copy_(a)`` over ``numel`` fp32 elements: the other reachable-bandwidth yardstick."""
    a = torch.rand(numel, device=device)
    b = torch.empty_like(a)
    return Variant("copy_baseline", "copy_", lambda: b.copy_(a), COPY_BYTES_PER_ELEMENT * numel)


def add_bandwidth_gbps(numel: int, device: torch.device, repeats: int | None = None) -> float:
    """GB/s of the add baseline over ``numel`` elements (median of ``repeats``, default default_repeats())."""
    baseline = add_baseline(numel, device)
    return gbps(baseline.bytes_moved, time_ms(baseline.fn, default_repeats() if repeats is None else repeats))


def synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a wait for the device: what pytest-benchmark times, so that queued device work counts."""

    def run():
        fn()
        synchronize()

    return run


def record_benchmark(benchmark, variant: Variant, baseline_gbps: float) -> None:
    """Run ``variant`` under pytest-benchmark and put bytes, GB/s and the bandwidth fraction in extra_info."""
    benchmark(synchronized(variant.fn))
    benchmark.extra_info["bytes"] = variant.bytes_moved
    if variant.compile_ms is not None:
        benchmark.extra_info["compile_ms"] = variant.compile_ms
    if variant.state_bytes is not None:
        benchmark.extra_info["state_bytes"] = variant.state_bytes
    if benchmark.stats is not None:  # None under --benchmark-disable, where the function runs once untimed
        achieved = gbps(variant.bytes_moved, benchmark.stats.stats.median * 1e3)
        benchmark.extra_info["gbps"] = achieved
        benchmark.extra_info["bandwidth_fraction"] = achieved / baseline_gbps


def per_backend(factory: Callable[..., Variant]) -> Callable[..., Variant]:
    """Marks a variant factory ``(inputs, backend) -> Variant`` as one variant per backend: for every one of
    ff.BACKENDS in pytest (skipped where unusable), for the usable ones in the CLI. Other factories take ``inputs``."""
    factory.per_backend = True
    return factory


def expand_backends(factories, backends) -> list[tuple[Callable[..., Variant], str | None]]:
    """(factory, backend) for every variant, in order: a per_backend factory once per backend, the others once
    (backend None)."""
    return [(f, b) for f in factories for b in (backends if getattr(f, "per_backend", False) else [None])]


def make_variant(factory: Callable[..., Variant], backend: str | None, inputs) -> Variant:
    return factory(inputs) if backend is None else factory(inputs, backend)


def bandwidth_baseline(inputs) -> Variant:
    """The add baseline over ``inputs.numel`` elements, as a variant factory."""
    return add_baseline(inputs.numel, bench_device())


def pytest_benchmarks(make_inputs: Callable[[float, torch.device], object], factories):
    """A bandwidth benchmark module's pytest side, for it to assign to ``inputs, test_variant``: the module-scoped
    ``inputs`` fixture (``make_inputs(scale, device)``, with a ``numel``) and one test parametrised over every
    variant of ``factories`` and the bandwidth baseline, with ids such as ``foreach`` and ``fused-cpu`` (so
    ``pytest bench/bench_<op>.py -k foreach`` picks one). Each records its bytes, GB/s and fraction of the
    ``add_bandwidth_gbps`` fixture (conftest.py's, over the GPT-2 list, unless the module overrides it)."""

    @pytest.fixture(scope="module", name="inputs")
    def inputs_fixture():
        return make_inputs(bench_scale(), bench_device())

    cases = expand_backends((*factories, bandwidth_baseline), ff.BACKENDS)
    ids = [factory.__name__ if backend is None else f"{factory.__name__}-{backend}" for factory, backend in cases]

    @pytest.mark.parametrize(("factory", "backend"), cases, ids=ids)
    def test_variant(benchmark, inputs, add_bandwidth_gbps, factory, backend):
        if backend is not None:
            require_backend(backend, ff.available_backends(), bench_device())
        record_benchmark(benchmark, make_variant(factory, backend, inputs), add_bandwidth_gbps)

    return inputs_fixture, test_variant


def arg_parser(
    description: str, scale_help: str = "dimension scale of the GPT-2 tensor list"
) -> argparse.ArgumentParser:
    """The options every benchmark's CLI has (--scale, --repeats, --warmup), for it to add its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--scale", type=float, default=bench_scale(), help=f"{scale_help} (default: FF_BENCH_SCALE, or smoke size)"
    )
    parser.add_argument("--repeats", type=int, default=default_repeats(), help="timed runs per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing each variant")
    return parser


def parse_args(description: str) -> argparse.Namespace:
    return arg_parser(description).parse_args()


def machine() -> dict:
    """What a figure was measured on: CPU model and count, memory, GPU, torch."""
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "gpu": None}
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["description"] = f"{info['cpus']} CPUs ({info['cpu']})" + (f", {info['gpu']}" if info["gpu"] else "")
    return info


def results_path() -> Path | None:
    """bench/results/<script>.json for a benchmark script run at full size; None under pytest or in smoke mode."""
    script = Path(sys.argv[0]).resolve()
    folder = os.environ.get(RESULTS_ENV, str(RESULTS_DIR))
    if smoke_mode() or not folder or script.parent != Path(__file__).resolve().parent:
        return None
    return Path(folder) / f"{script.stem}.json"


def write_results(path: Path, tables: list[dict]) -> None:
    results = {
        "benchmark": path.stem,
        "command": " ".join(["python", os.path.relpath(sys.argv[0], RESULTS_DIR.parent.parent), *sys.argv[1:]]),
        "scale": bench_scale(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch": torch.__version__,
        "fastforget": ff.__version__,
        "tables": tables,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"results: {path}")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    table = {"headers": list(headers), "rows": [[str(cell) for cell in row] for row in rows]}
    if RECORDED_TABLES is not None:
        RECORDED_TABLES.append(table)
    path = results_path()
    if path is not None:
        if not _RESULT_TABLES:
            atexit.register(write_results, path, _RESULT_TABLES)
        _RESULT_TABLES.append(table)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def run_table(
    variants: list[Variant],
    baseline: Variant,
    repeats: int,
    warmup: int = 1,
    reference: str = "eager_reference",
    skipped: dict[str, str] | None = None,
) -> list[float]:
    """Time the baseline and every variant (interleaved), then print ms, GB/s, fraction of add-bandwidth, speed-up,
    and why each backend in ``skipped`` (name -> reason, from usable_backends) was left out. Where some variant has
    ``state_bytes``, also print them and their percentage of the reference's. Returns the variants' median ms."""
    copy = copy_baseline(baseline.bytes_moved // ADD_BYTES_PER_ELEMENT, bench_device())
    fns = [baseline.fn, copy.fn] + [v.fn for v in variants]
    baseline_ms, copy_ms, *variant_ms = time_interleaved(fns, repeats, warmup)
    baseline_gbps, copy_gbps = gbps(baseline.bytes_moved, baseline_ms), gbps(copy.bytes_moved, copy_ms)
    timings = list(zip(variants, variant_ms))
    reference_ms = next((ms for variant, ms in timings if variant.name == reference), math.nan)
    with_state = any(variant.state_bytes is not None for variant in variants)
    reference_state = next((v.state_bytes for v in variants if v.name == reference and v.state_bytes), None)

    def state_cells(variant: Variant) -> list[str]:
        if not with_state:
            return []
        if variant.state_bytes is None:
            return ["-", "-"]
        share = "-" if reference_state is None else f"{100 * variant.state_bytes / reference_state:.4g}%"
        return [f"{variant.state_bytes:,}", share]

    def row(variant: Variant, ms: float, speedup: str) -> list[str]:
        achieved = gbps(variant.bytes_moved, ms)
        compile_ms = "-" if variant.compile_ms is None else f"{variant.compile_ms:.0f}"
        return [
            variant.name,
            variant.backend,
            f"{ms:.3f}",
            f"{achieved:.1f}",
            f"{achieved / baseline_gbps:.2f}",
            f"{achieved / copy_gbps:.2f}",
            speedup,
            compile_ms,
            *state_cells(variant),
        ]

    rows = [row(variant, ms, f"{reference_ms / ms:.2f}x") for variant, ms in timings]
    rows += [row(baseline, baseline_ms, "-"), row(copy, copy_ms, "-")]
    state_headers = ["state_bytes", f"state_vs_{reference}"] if with_state else []
    print_table(
        ["variant", "backend", "ms", "GB/s", "frac_add", "frac_copy", "speedup", "compile_ms", *state_headers], rows
    )
    legend = (
        f"ms: median of {repeats}; frac_add, frac_copy: GB/s over the torch.add and copy_ baselines' (same run); "
        f"speedup: vs {reference}; "
        "compile_ms: first call of a compiled variant"
    )
    if with_state:
        legend += f"; state_bytes: kept between runs; state_vs_{reference}: percentage of {reference}'s"
    print(legend)
    for backend, reason in (skipped or {}).items():
        print(f"skipped backend {backend}: {reason}")
    return variant_ms


def run_variants(
    factories, inputs, args: argparse.Namespace, reference: str = "eager_reference"
) -> tuple[list[Variant], list[float]]:
    """A bandwidth benchmark's CLI table: build every variant of ``factories`` on ``inputs`` (each per_backend one
    for every backend usable here), then run_table them against the add baseline over ``inputs.numel`` elements
    with ``args.repeats`` and ``args.warmup``. Returns the variants and their median ms."""
    device = bench_device()
    backends, skipped = usable_backends(ff.available_backends(), device)
    variants = [make_variant(factory, backend, inputs) for factory, backend in expand_backends(factories, backends)]
    baseline = add_baseline(inputs.numel, device)
    return variants, run_table(variants, baseline, args.repeats, args.warmup, reference, skipped)
