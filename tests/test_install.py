"""`pip install` as a user runs it, in a throw-away venv: build isolation, a pure-Python wheel, and the just-in-time
build of the C++ kernels on first use (one build for concurrent processes, reused by the next process; a broken
compiler or an unwritable cache folder falls back to the reference with one warning).

The venv is made without network: `python -m venv --without-pip` plus a .pth file that puts this interpreter's
site-packages (torch, ninja, ...) on its path; pip (this interpreter's, `--python`) installs the package into it
with default build isolation (the isolated build environment gets setuptools and wheel from the configured index).

The tests that compile the kernels (minutes on 2 cores) run where FF_TEST_JIT_BUILD=1 (.ci/run sets it); the
install, the import, the reference op and both failure paths run always.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fastforget as ff

REPO = Path(__file__).resolve().parents[1]
JIT_BUILD = os.environ.get("FF_TEST_JIT_BUILD", "0") not in ("", "0")
needs_jit_build = pytest.mark.skipif(not JIT_BUILD, reason="compiles the kernels (minutes): FF_TEST_JIT_BUILD=1")
BUILD_TIMEOUT = 1200


def _copy_checkout(dest: Path) -> Path:
    """The checkout's sources without build outputs, venvs or caches (pip builds in the tree it is given)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "*.o", "__pycache__",
                                    ".pytest_cache", ".hypothesis", ".benchmarks", "demo_out", "kernels")  # fmt: skip
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    shutil.copytree(REPO / "kernels", dest / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def make_venv(root: Path, *pip_args: str) -> dict:
    """A fresh venv in `root` that sees this interpreter's packages, with fastforget installed from a copy of the
    checkout by `pip install <pip_args> <copy>` (default build isolation)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "v")], check=True, timeout=120)
    python = root / "v" / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", where], text=True).strip())
    base = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "base_site_packages.pth").write_text("\n".join(sorted(base)) + "\n")
    source = _copy_checkout(root / "src")
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-warn-conflicts", *pip_args]
    install = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=600, cwd=root)
    assert install.returncode == 0, install.stdout + install.stderr
    return {"python": python, "root": root, "source": source}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    return make_venv(tmp_path_factory.mktemp("install"))


def test_editable_install_builds_from_the_checkout(tmp_path):
    """`pip install -e` with build isolation: the package, its Triton kernels and the C++ sources the just-in-time
    build compiles all come from the checkout."""
    editable = make_venv(tmp_path, "-e")
    code = """
        import fastforget, fastforget.kernels
        from fastforget import _build
        print(fastforget.__file__, fastforget.kernels.__file__, _build.source_root())
    """
    completed = run(editable, code, tmp_path / "cache")
    assert completed.returncode == 0, completed.stderr
    package, kernels, sources = (Path(p).resolve() for p in completed.stdout.split())
    source = editable["source"].resolve()
    expected = (source / "fastforget/__init__.py", source / "kernels/__init__.py", source / "csrc")
    assert (package, kernels, sources) == expected


def run(venv, code: str, cache: Path, timeout=BUILD_TIMEOUT, env=None, background=False):
    """`code` in the venv's interpreter, outside the checkout, with `cache` as FASTFORGET_CACHE."""
    environment = {k: v for k, v in os.environ.items() if k not in ("FASTFORGET_JIT", "FASTFORGET_BACKEND")}
    environment.pop("TRITON_INTERPRET", None)
    environment.update({"FASTFORGET_CACHE": str(cache), "PYTHONWARNINGS": "default"}, **(env or {}))
    argv = [str(venv["python"]), "-c", textwrap.dedent(code)]
    kwargs = dict(cwd=venv["root"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if background:
        return subprocess.Popen(argv, **kwargs)
    return subprocess.run(argv, timeout=timeout, **kwargs)


# One EWC penalty on fixed inputs; prints the backend that ran, the penalty's bits and where the kernels came from.
EWC_PROGRAM = textwrap.dedent("""
    import time
    start = time.monotonic()
    import torch, fastforget as ff
    from fastforget import _extension
    imported = time.monotonic() - start
    loaded_at_import = _extension.LOADED_FROM
    torch.manual_seed(0)
    params = [torch.randn(1000, 37), torch.randn(513)]
    anchors = [p + torch.randn_like(p) for p in params]
    fisher = [torch.rand_like(p) for p in params]
    backend = ff.dispatch.resolve("auto", torch.device("cpu"), "ewc_penalty")
    penalty = ff.ewc_penalty(params, anchors, fisher, 0.25)
    print("RESULT", ff.__file__, backend, penalty.item().hex(), loaded_at_import, imported)
""")


def result(completed):
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    _, file, backend, bits, loaded_at_import, imported = line.split()
    return {"file": file, "backend": backend, "penalty": float.fromhex(bits),
            "loaded_at_import": loaded_at_import, "import_seconds": float(imported)}  # fmt: skip


def expected_penalty():
    torch.manual_seed(0)
    params = [torch.randn(1000, 37), torch.randn(513)]
    anchors = [p + torch.randn_like(p) for p in params]
    fisher = [torch.rand_like(p) for p in params]
    return params, anchors, fisher


def test_wheel_is_pure_python_with_the_sources(tmp_path):
    """`pip wheel` with build isolation: py3-none-any, the Triton kernels and every C++/CUDA source inside."""
    source = _copy_checkout(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("fastforget-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted((REPO / "csrc").rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            assert f"fastforget/_csrc/{path.relative_to(REPO / 'csrc')}" in names, path
    assert {"fastforget/kernels/__init__.py", "fastforget/_extension.py", "fastforget/_build.py"} <= names
    for init in sorted((REPO / "fastforget").rglob("__init__.py")):  # every subpackage, e.g. fastforget/replay
        if "kernels" not in init.relative_to(REPO).parts:
            assert str(init.relative_to(REPO)) in names, init
    assert not any(name.endswith(".so") for name in names)
    requires = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    assert "Requires-Dist: ninja" in requires and "Requires-Dist: torch>=2.11" in requires
    pyproject = (REPO / "pyproject.toml").read_text()
    build_requires = pyproject.split("requires = ", 1)[1].split("\n", 1)[0]
    assert "torch" not in build_requires, build_requires


def test_installed_package_imports_and_runs_the_reference(venv, tmp_path):
    """The venv's fastforget is the installed one, imports without building, and runs an op on the reference."""
    program = EWC_PROGRAM.replace('backend = ff.dispatch.resolve("auto", torch.device("cpu"), "ewc_penalty")',
                                  'backend = "reference"').replace("0.25)", "0.25, backend='reference')")  # fmt: skip
    out = result(run(venv, program, tmp_path / "cache"))
    assert out["file"].startswith(str(venv["root"] / "v")), out["file"]
    assert out["backend"] == "reference" and out["loaded_at_import"] == "None"
    assert not (tmp_path / "cache").exists()  # importing built nothing
    params, anchors, fisher = expected_penalty()
    assert out["penalty"] == pytest.approx(ff.ewc_penalty_ref(params, anchors, fisher, 0.25).item(), rel=1e-6)


def test_status_before_the_first_build(venv, tmp_path):
    """available_backends() reports the cpu backend as built on first use, and where."""
    code = """
        import fastforget as ff
        s = ff.available_backends()["cpu"]
        print(s.available, s.reason)
    """
    completed = run(venv, code, tmp_path / "cache")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("True") and "built on first use" in completed.stdout, completed.stdout
    assert "python -m fastforget build" in completed.stdout


@pytest.mark.parametrize("failure", ["broken compiler", "unwritable cache"])
def test_a_build_that_cannot_run_warns_once_and_falls_back(venv, tmp_path, failure):
    if failure == "broken compiler":
        cache, env, reason = tmp_path / "cache", {"CXX": "/bin/false"}, "building the C++ kernels failed"
    else:
        (tmp_path / "a-file").write_text("")
        cache, env, reason = tmp_path / "a-file" / "cache", {}, "is not writable"
    program = EWC_PROGRAM + (
        "\nimport warnings\nwith warnings.catch_warnings():\n    warnings.simplefilter('error')\n"
        "    ff.ewc_penalty(params, anchors, fisher, 0.25)  # warned once only\n"
    )
    completed = run(venv, program, cache, env=env, timeout=600)
    out = result(completed)
    assert out["backend"] == "reference", completed.stderr
    warnings = [line for line in completed.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and reason in warnings[0] and "pure-torch reference" in warnings[0], completed.stderr
    params, anchors, fisher = expected_penalty()
    assert out["penalty"] == pytest.approx(ff.ewc_penalty_ref(params, anchors, fisher, 0.25).item(), rel=1e-6)


@pytest.fixture(scope="module")
def jit_cache(venv):
    return venv["root"] / "jit-cache"


@needs_jit_build
def test_concurrent_first_uses_build_once(venv, jit_cache):
    """Two processes (like two DDP ranks) both need the kernels first thing: one builds, the other waits for it,
    both run the cpu backend, with the ahead-of-time build's result bit for bit."""
    processes = [run(venv, EWC_PROGRAM, jit_cache, background=True) for _ in range(2)]
    outputs = [p.communicate(timeout=BUILD_TIMEOUT) for p in processes]
    completed = [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(processes, outputs)]
    results = [result(c) for c in completed]
    stderr = "".join(c.stderr for c in completed)
    assert stderr.count("fastforget: building the CPU kernels") == 1, stderr
    assert [r["backend"] for r in results] == ["cpu", "cpu"], stderr
    (library,) = jit_cache.glob("extensions/*/fastforget_C.so")
    assert (library.parent / "build.json").exists()
    params, anchors, fisher = expected_penalty()
    if ff.dispatch._why_not("cpu", "cpu") is None:  # the checkout's ahead-of-time build
        ahead_of_time = ff.ewc_penalty(params, anchors, fisher, 0.25, backend="cpu").item()
        assert all(r["penalty"] == ahead_of_time for r in results), (results, ahead_of_time)
    reference = ff.ewc_penalty_ref(params, anchors, fisher, 0.25).item()
    assert all(r["penalty"] == pytest.approx(reference, rel=1e-5) for r in results)


@needs_jit_build
def test_a_second_process_reuses_the_build(venv, jit_cache):
    """The next process loads the cached build at import (one dlopen): no compile, the library untouched."""
    (library,) = jit_cache.glob("extensions/*/fastforget_C.so")
    before = library.stat().st_mtime_ns
    completed = run(venv, EWC_PROGRAM, jit_cache, timeout=300)
    out = result(completed)
    assert out["backend"] == "cpu" and out["loaded_at_import"] == str(library), completed.stderr
    assert "building" not in completed.stderr and library.stat().st_mtime_ns == before
    cli = run(venv, "from fastforget.__main__ import main; raise SystemExit(main(['build']))", jit_cache, timeout=300)
    assert cli.returncode == 0 and str(library) in cli.stdout and "building" not in cli.stderr, cli.stderr
