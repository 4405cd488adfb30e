"""The backend table: explicit choice, FASTFORGET_BACKEND, auto fallback, and the reasons it reports."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastforget as ff
from fastforget import _extension, dispatch


def inputs():
    p = torch.randn(10)
    return [p], [p + 1], [torch.ones(10)]


def test_available_backends_reports_every_backend_with_a_reason():
    status = ff.available_backends()
    assert set(status) == set(ff.BACKENDS)
    assert status["reference"].available
    assert status["cpu"].available, status["cpu"].reason  # built by `pip install -e .`
    for s in status.values():
        assert isinstance(s, ff.BackendStatus) and s.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve("auto", torch.device("cpu"), "ewc_penalty") == "cpu"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve("auto", torch.device("cpu"), "ewc_penalty") == "reference"
    assert dispatch.resolve("cpu", torch.device("cpu"), "ewc_penalty") == "cpu"  # the argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ff.ewc_penalty(*inputs(), 0.4)


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ff.ewc_penalty(*inputs(), 0.4, backend="gpu")


def test_explicit_backend_that_cannot_run_raises_with_reason():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        ff.ewc_penalty(*inputs(), 0.4, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from fastforget.kernels import multi_tensor

    monkeypatch.setattr(multi_tensor, "DEVICE_TYPES", ("cuda",))  # kernels defined without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ff.ewc_penalty(*inputs(), 0.4, backend="triton")


def test_missing_extension_falls_back_to_reference_and_warns_once(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "fastforget._C failed to load (simulated)")
    monkeypatch.setattr(dispatch, "_warned", set())
    assert not ff.available_backends()["cpu"].available
    assert "simulated" in ff.available_backends()["cpu"].reason
    with pytest.raises(RuntimeError, match="simulated"):
        ff.ewc_penalty(*inputs(), 0.4, backend="cpu")
    with pytest.warns(RuntimeWarning, match="using the pure-torch reference"):
        penalty = ff.ewc_penalty(*inputs(), 0.4)
    assert penalty.item() == pytest.approx(4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.ewc_penalty(*inputs(), 0.4)  # warned once only


def test_bare_import_loads_the_extension():
    # `import fastforget` first thing (torch not yet imported) must still load the C++ kernels
    code = "import fastforget as ff; s = ff.available_backends()['cpu']; assert s.available, s.reason"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_import_without_the_extension_uses_the_reference():
    # a real interpreter in which fastforget._C cannot be imported
    code = (
        "import sys, warnings; sys.modules['fastforget._C'] = None\n"
        "import torch, fastforget as ff\n"
        "status = ff.available_backends()['cpu']\n"
        "assert not status.available and 'fastforget._C failed to load' in status.reason, status\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    p = torch.ones(3, requires_grad=True)\n"
        "    ff.ewc_penalty([p], [torch.zeros(3)], [torch.ones(3)], 0.5).backward()\n"
        "assert any('pure-torch reference' in str(w.message) for w in caught)\n"
        "assert p.grad.tolist() == [1.0, 1.0, 1.0]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_kernels_not_built_yet_are_reported_and_built_by_the_first_op(monkeypatch):
    """Before the just-in-time build, available_backends() only reports (cpu: built on first use); the first op on
    the cpu backend builds, and a build that fails warns once, with its reason, and runs the reference."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_extension, "LOADED_FROM", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "_build_tried", False)
    monkeypatch.setattr(dispatch, "_warned", set())
    builds = []

    def failing_build():
        builds.append(1)
        raise _extension.BuildError("no C++ compiler: 'c++' is not on PATH (simulated)")

    monkeypatch.setattr(_extension, "build", failing_build)
    status = ff.available_backends()["cpu"]
    assert status.available and "built on first use" in status.reason and "python -m fastforget build" in status.reason
    assert not builds  # reporting builds nothing
    with pytest.warns(RuntimeWarning, match=r"not on PATH \(simulated\).*pure-torch reference"):
        assert ff.ewc_penalty(*inputs(), 0.4).item() == pytest.approx(4.0)
    assert builds == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.ewc_penalty(*inputs(), 0.4)  # no second build, no second warning
    assert builds == [1]
    assert not ff.available_backends()["cpu"].available and "simulated" in ff.available_backends()["cpu"].reason
    with pytest.raises(RuntimeError, match="simulated"):
        ff.ewc_penalty(*inputs(), 0.4, backend="cpu")


def test_the_build_cache_is_keyed_by_what_the_build_depends_on(monkeypatch, tmp_path):
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path))
    spec = _extension.build_spec()
    name = spec.directory.name
    assert spec.directory.parent == tmp_path / "extensions"
    assert f"fastforget-{ff.__version__}" in name and f"torch-{torch.__version__}-cxx11abi" in name
    assert ("nocuda" in name) == (not spec.with_cuda)
    assert {p.name for p in spec.sources} >= {"extension.cpp", "ewc_penalty.cpp"}
    assert not any(flag.startswith("-std=") for flag in spec.cxx_flags)  # torch adds the standard its headers need
    monkeypatch.setenv("FASTFORGET_CPU_ARCH", "x86-64-v2")
    other = _extension.build_spec()
    assert other.directory != spec.directory and "-march=x86-64-v2" in other.cxx_flags
    monkeypatch.delenv("FASTFORGET_CPU_ARCH")
    assert _extension.build_spec().directory == spec.directory  # deterministic


def test_an_edited_source_or_header_gets_its_own_build(monkeypatch, tmp_path):
    import shutil

    from fastforget import _build

    sources = shutil.copytree(_build.source_root(), tmp_path / "csrc")
    monkeypatch.setattr(_build, "source_root", lambda: sources)
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path / "cache"))
    before = _extension.build_spec().directory
    header = sources / "common.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _extension.build_spec().directory != before
