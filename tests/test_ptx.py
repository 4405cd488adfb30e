"""Every Triton kernel of kernels/ as compiled for an H100/H200 (sm_90), read here without a GPU: each launcher is
run on CPU tensors with the kernel launch replaced by a compilation for sm_90 (the same specialisation a real
launch gets), and the PTX and ptxas' resource usage are checked: 16-byte vector loads on the multi-tensor kernels'
aligned path, no register spills for fp32, bf16 and fp16 lists, and no approximate exp or division where a threshold
or a variance depends on it.

The compilation runs in a subprocess without TRITON_INTERPRET (conftest.py sets it for the suite; kernels defined
under it belong to the interpreter). Where this Triton cannot compile for a CUDA target, the tests skip with the
reason. Run as a script (`python tests/test_ptx.py`) it prints the table of every compiled kernel.
"""

import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

FLOAT_DTYPES = ("fp32", "bf16", "fp16")  # spill-free required; fp64 is compiled and reported
# the lists' dtypes compiled: fp32 and bf16 (the suite's 60 s); FF_PTX_ALL=1 adds fp16 and fp64 (the table's)
LIST_DTYPES = ("fp32", "bf16", "fp16", "fp64") if os.environ.get("FF_PTX_ALL") == "1" else ("fp32", "bf16")
MULTI_TENSOR_KERNELS = (
    "_ewc_kernel",
    "_fisher_update_kernel",
    "_weight_merge_kernel",
    "_max_var_kernel",
    "_protect_kernel",
    "_block_moments_kernel",
    "_scale_kernel",
)
EXACT_MATH_KERNELS = (
    "_protect_kernel",
    "_block_moments_kernel",
    "_merge_moments_kernel",
    "_step_kernel",
    "_update_kernel",
    "_step8bit_kernel",
)
SHOWN_CONSTEXPRS = ("PASS", "ALIGNED", "KEEP_A", "RANK", "KEEP_C", "BIAS", "BLOCK_N", "SPLIT")
APPROXIMATE = re.compile(r"\b(?:ex2\.approx|lg2\.approx|div\.full|div\.approx|rcp\.approx|sqrt\.approx)[\w.]*")


# ---- the subprocess: run every launcher with its launches compiled for sm_90 ----------------------------------


class Skip(Exception):
    """This Triton cannot compile for a CUDA target here."""


def _compiler():
    """(compile(fn, args, kwargs) -> CompiledKernel for sm_90, tools) or raise Skip."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        ptxas = get_ptxas(90).path
    except Exception as error:  # no CUDA backend in this Triton, or its internals differ
        raise Skip(f"this Triton cannot compile for sm_90 here: {error!r}") from error
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    binders = {}

    def compile_launch(fn, args, kwargs):
        """What fn[grid](*args, **kwargs) would compile on an sm_90 device (runtime.jit.JITFunction.run)."""
        kwargs = dict(kwargs, debug=False)
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        return kernel, signature, constexprs

    return compile_launch, ptxas, cuobjdump


def _resources(kernel, ptxas, cuobjdump):
    """Registers and stack bytes of the cubin; where the stack is not empty, ptxas -v's spill store/load bytes."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
        spills = (0, 0)
        if stack:
            ptx = os.path.join(folder, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            arch = re.search(r"\.target (sm_\w+)", kernel.asm["ptx"]).group(1)
            log = subprocess.run(
                [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx, "-o", os.path.join(folder, "o")],
                capture_output=True,
                text=True,
            ).stderr
            spills = tuple(map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()))
    return dict(registers=registers, stack=stack, spill_stores=spills[0], spill_loads=spills[1])


def _workloads():
    """(label, launcher, args) for every launcher of kernels/, on CPU tensors: lists with full blocks, a tail and a
    misaligned view (storage offset 1), per dtype; the LoRA products at sizes that take both kinds of tiles."""
    import torch

    from fastforget.kernels import (
        anchored_lm_loss,
        ewc_penalty,
        fisher_update,
        grad_ema,
        grad_moments,
        lora_linear,
        mofo,
        protected_adamw8bit_step,
        protected_adamw_step,
        scale_grads,
        weight_merge,
    )
    from fastforget.quantize import dynamic_map

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    for label in LIST_DTYPES:
        dtype = dtypes[label]
        state = torch.float64 if dtype == torch.float64 else torch.float32

        def tensors(dt=dtype):
            aligned = torch.zeros(2 * 4096 + 100, dtype=dt)
            return [aligned, torch.zeros(4097, dtype=dt)[1:]]  # the second one: storage offset 1

        one = torch.ones((), dtype=state)
        alpha = torch.full((2,), 0.5, dtype=state)
        yield label, ewc_penalty.ewc_penalty, (tensors(), tensors(), tensors(), 0.5)
        yield label, ewc_penalty.ewc_penalty_backward, (tensors(), tensors(), tensors(), 0.5, one)
        yield label, ewc_penalty.ewc_penalty_accumulate, (tensors(), tensors(), tensors(), tensors(), 0.5)
        yield label, fisher_update.fisher_update, (tensors(), tensors(), 0.9, 0.1)
        yield label, grad_ema.grad_ema_stats, (tensors(), tensors(state), tensors(state), one, alpha)
        protect_args = (tensors(), tensors(state), tensors(state), one, alpha, alpha, torch.zeros((), dtype=bool), 0.5)
        yield label, grad_ema.grad_ema_protect, protect_args
        yield label, grad_moments.grad_moments, (tensors(), one)
        yield label, scale_grads.scale_grads, (tensors(), alpha)
        out, other = tensors(), tensors()
        yield label, weight_merge.weight_merge, (out, [*tensors(state), *out], [], [0.5, 0.5], [])  # WiSE-FT
        yield label, weight_merge.weight_merge, ([*out], [*out, *other], [*tensors(state), *tensors()], [0.5, 0.5],
                                                 [1e-6, 0.0])  # fmt: skip
    for label in ("fp32", "bf16"):  # the protected AdamW step: plain, EWC + per-tensor factors, EWC + element + SI
        params = [torch.zeros(2 * 4096 + 100, dtype=dtypes[label]), torch.zeros(4097, dtype=dtypes[label])[1:]]

        def state(params=params):
            return [torch.zeros(p.shape) for p in params]

        steps, count = [torch.zeros(1) for _ in params], torch.full((2,), 0.5)
        step = protected_adamw_step.protected_adamw_step
        base = (params, [p.clone() for p in params], state(), state(), steps)
        hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5, 0.1, False)
        yield label, step, (*base, [], [], None, [], [], None, None, [], None, None, *hyper)
        yield label, step, (*base, state(), state(), count, [], [], None, None, [], None, None, *hyper)
        yield label, step, (*base, state(), state(), None, state(), state(), count, count, state(), None, None, *hyper)
    for label in ("fp32", "bf16"):  # MoFO: the select's histograms (fp32 moments), the masked update with SI
        params = [torch.zeros(2 * 4096 + 100, dtype=dtypes[label]), torch.zeros(4097, dtype=dtypes[label])[1:]]
        moments = [torch.zeros(p.shape) for p in params]
        prefix = torch.zeros(2, dtype=torch.long)
        yield label, mofo.mofo_histogram, (moments, prefix, 21, 11)  # the first pass: every element counts
        yield label, mofo.mofo_histogram, (moments, prefix, 10, 11)  # a later one: those matching the prefix
        update_args = (params, moments, [m.clone() for m in moments], [torch.ones(1) for _ in params],
                       torch.tensor([5, -1]), [p.clone() for p in params], [m.clone() for m in moments], None, None,
                       1e-3, 0.9, 0.999, 1e-8, 0.01, False)  # fmt: skip
        yield label, mofo.mofo_update, update_args
    for label in ("fp32", "bf16"):  # the 8-bit step: plain, EWC (float Fisher) + factors, EWC (8-bit) + element + SI
        params = [torch.zeros(2 * 4096 + 100, dtype=dtypes[label]), torch.zeros(4097, dtype=dtypes[label])[1:]]

        def codes(params=params):
            return [torch.zeros(p.shape, dtype=torch.uint8) for p in params]

        def absmax(params=params):
            return [torch.zeros(-(-p.numel() // 256)) for p in params]

        def state(params=params):
            return [torch.zeros(p.shape) for p in params]

        steps, count = [torch.zeros(1) for _ in params], torch.full((2,), 0.5)
        step = protected_adamw8bit_step.protected_adamw8bit_step
        base = (params, [p.clone() for p in params], codes(), codes(), absmax(), absmax(), dynamic_map(True),
                dynamic_map(False), steps)  # fmt: skip
        hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5, 0.1, False)
        yield label, step, (*base, [], [], [], None, [], [], None, None, [], None, None, *hyper)
        yield label, step, (*base, state(), state(), [], count, [], [], None, None, [], None, None, *hyper)
        ewc8 = (state(), codes(), absmax(), None, state(), state(), count, count, state(), None, None)
        yield label, step, (*base, *ewc8, *hyper)
    for label in ("fp32", "bf16"):  # anchored LM loss rows: a vocabulary that is no multiple of the block
        logits = torch.zeros(8, 32001, dtype=dtypes[label])
        labels, weights, scale = torch.zeros(8, dtype=torch.long), torch.ones(8), torch.ones(1)
        for reverse in (False, True):
            rows_args = (logits, logits.clone(), labels, weights, scale, 0.5, 2.0, reverse, -100)
            yield label, anchored_lm_loss.anchored_lm_loss_rows, rows_args
    lora_runs = [("fp32", 0), ("bf16", 0), ("bf16", 132)]  # split-K below 132 tiles (an H200's SMs) or never
    if "fp64" in LIST_DTYPES:  # FF_PTX_ALL
        lora_runs.append(("fp32", 132))
    for label, split_below in lora_runs:
        lora_linear.SPLIT_K_BELOW = split_below  # on CPU tensors, None would mean "never split"
        # M = 1024 and out = 640: K long enough for split-K in every rank-r product (and dW)
        x = torch.zeros(1024, 512, dtype=dtypes[label])
        weight, bias = torch.zeros(640, 512, dtype=x.dtype), torch.zeros(640, dtype=x.dtype)
        lora_A, lora_B = torch.zeros(16, 512, dtype=x.dtype), torch.zeros(640, 16, dtype=x.dtype)
        keep = torch.ones(1024, 512, dtype=torch.bool)
        yield label, lora_linear.lora_linear, (x, weight, bias, lora_A, lora_B, keep, 2.0)
        S, grad_y = torch.zeros(1024, 16, dtype=x.dtype), torch.zeros(1024, 640, dtype=x.dtype)
        backward_args = (grad_y, x, weight, lora_A, lora_B, keep, S, 2.0, [True] * 5)
        yield label, lora_linear.lora_linear_backward, backward_args


def _describe(value):
    return getattr(value, "name", None) or repr(value)


def compile_all(part=0, parts=1):
    """Every distinct kernel specialisation the launchers compile (those of workloads part, part + parts, ...), with
    its PTX facts and resource usage."""
    compile_launch, ptxas, cuobjdump = _compiler()
    from triton.runtime.jit import JITFunction

    records, seen, label = [], set(), [None]

    def run(fn, *args, grid, warmup, **kwargs):
        kernel, signature, constexprs = compile_launch(fn, args, kwargs)
        key = (fn.__name__, kernel.hash)
        if key in seen:
            return kernel
        seen.add(key)
        ptx = kernel.asm["ptx"]
        records.append(
            dict(
                kernel=fn.__name__,
                hash=kernel.hash,
                order=(workload[0], len(records)),
                dtype=label[0],
                constexprs={fn.arg_names[path[0]]: _describe(v) for path, v in constexprs.items()},
                num_warps=kernel.metadata.num_warps,
                loads=sorted(set(re.findall(r"\bld\.global[\w.]*", ptx))),
                approximate=sorted(set(APPROXIMATE.findall(ptx))),
                **_resources(kernel, ptxas, cuobjdump),
            )
        )
        return kernel

    JITFunction.run = run
    workload = [0]
    for workload[0], (label[0], launcher, args) in enumerate(_workloads()):
        if workload[0] % parts == part:
            launcher(*args)
    return records


def main(path, part=0, parts=1):
    try:
        result = dict(records=compile_all(part, parts))
    except Skip as reason:
        result = dict(skip=str(reason))
    with open(path, "w") as f:
        json.dump(result, f)


# ---- the tests -------------------------------------------------------------------------------------------------


@functools.cache
def compiled(parts=2):
    """The records of every workload, compiled by `parts` processes at once (each a share of the workloads)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"part{i}.json") for i in range(parts)]
        runs = [
            subprocess.Popen(
                [sys.executable, __file__, path, str(i), str(parts)], stderr=subprocess.PIPE, text=True, env=env
            )
            for i, path in enumerate(paths)
        ]
        errors = [(run.communicate(timeout=600)[1], run.returncode) for run in runs]
        errors = [log for log, returncode in errors if returncode]
        if any(errors):
            pytest.fail(f"compiling the kernels for sm_90 failed:\n{''.join(errors)[-6000:]}")
        results = []
        for path in paths:
            with open(path) as f:
                results.append(json.load(f))
    if "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    unique = {(r["kernel"], r["hash"]): r for result in results for r in result["records"]}
    return sorted(unique.values(), key=lambda r: r["order"])


def _name(record):
    flags = ",".join(f"{k}={v}" for k, v in record["constexprs"].items() if k in SHOWN_CONSTEXPRS)
    return f"{record['kernel']}[{record['dtype']}{',' if flags else ''}{flags}]"


def test_every_kernel_is_compiled():
    import fastforget.kernels as kernels

    names = set()
    for module in (getattr(kernels, m) for m in dir(kernels) if not m.startswith("_")):
        names |= {n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    assert names <= {r["kernel"] for r in compiled()}


def test_no_register_spills():
    spilling = [
        f"{_name(r)}: {r['registers']} registers, {r['stack']} B stack, spill {r['spill_stores']}/{r['spill_loads']} B"
        for r in compiled()
        if r["dtype"] in FLOAT_DTYPES and (r["stack"] or r["spill_stores"] or r["spill_loads"])
    ]
    assert not spilling, spilling


def test_aligned_multi_tensor_kernels_issue_vector_loads():
    aligned = [r for r in compiled() if r["kernel"] in MULTI_TENSOR_KERNELS and r["constexprs"]["ALIGNED"] == "True"]
    assert {r["kernel"] for r in aligned} == set(MULTI_TENSOR_KERNELS)
    scalar = [_name(r) for r in aligned if not any(".v4." in ld or ".v2." in ld for ld in r["loads"])]
    assert not scalar, scalar


def test_misaligned_path_is_compiled_too():
    kinds = {(r["kernel"], r["constexprs"].get("ALIGNED")) for r in compiled()}
    assert {(k, "False") for k in MULTI_TENSOR_KERNELS} <= kinds


def test_no_approximate_math_where_a_threshold_or_variance_depends_on_it():
    approximate = [f"{_name(r)}: {r['approximate']}" for r in compiled() if r["kernel"] in EXACT_MATH_KERNELS]
    assert not [a for a in approximate if not a.endswith("[]")], approximate


def print_table(path):
    with open(path) as f:
        result = json.load(f)
    for r in result.get("records", []):
        spills = f"spill {r['spill_stores']}/{r['spill_loads']} B" if r["stack"] else ""
        print(f"{_name(r):52} warps {r['num_warps']:2} regs {r['registers']:3} stack {r['stack']:4} {spills}")
        print(f"{'':52} {' '.join(r['loads'])} {' '.join(r['approximate'])}")
    print(result.get("skip", ""))


if __name__ == "__main__":  # python tests/test_ptx.py OUT.json [PART PARTS | --table]
    if "TRITON_INTERPRET" in os.environ:
        sys.exit("run without TRITON_INTERPRET")
    if sys.argv[2:] == ["--table"]:
        print_table(sys.argv[1])
    else:
        main(sys.argv[1], *map(int, sys.argv[2:]))
