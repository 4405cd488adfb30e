"""Weight averaging of K models over a whole parameter list, in one launch:

    linear (no Fisher):  out = sum_k w_k theta_k
    Fisher-weighted:     out = sum_k w_k F~_k theta_k / sum_k w_k F~_k,   F~_k = max(F_k, floor_k)

The linear form with K = 2, w = (1 - alpha, alpha) is WiSE-FT's interpolation (Wortsman et al. 2022); the Fisher
form is Matena & Raffel's Fisher merging ("Merging Models with Fisher-Weighted Averaging", NeurIPS 2022),
whose reference implementation (mmatena/model_merging, merging.py) guards the denominator by flooring the Fisher
(default 1e-6) of the first ("target") model, or of every model, rather than adding an epsilon: a parameter no
model's Fisher sees then takes the target model's value instead of 0/0. ``floors[k]`` is that floor per model.

Each source is read once per element and ``out`` written once, with fp32 accumulation (fp64 for fp64 outputs) and
one rounding to ``out``'s dtype; sources may be fp32, bf16, fp16 or fp64 independently (an EWC object's fp32 anchors
and Fisher beside bf16 parameters). ``out[i]`` may be one of its own sources (in-place interpolation).
"""

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname


def weight_merge_ref(out, models, weights, fisher=None, floors=None):
    """Pure torch, per tensor, in fp32 (fp64 for fp64 outputs), rounded once to out."""
    acc = accumulate_dtype(out)
    floors = [0.0] * len(models) if floors is None else floors
    with torch.no_grad():
        for i, target in enumerate(out):
            thetas = [m[i].to(acc) for m in models]
            if fisher is None:
                merged = sum(w * t for w, t in zip(weights, thetas))
            else:
                scaled = [w * f[i].to(acc).clamp_min(floor) for w, f, floor in zip(weights, fisher, floors)]
                merged = sum(s * t for s, t in zip(scaled, thetas)) / sum(scaled)
            target.copy_(merged)


def _same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _check_inputs(out, models, weights, fisher, floors):
    out = check.tensor_list("out", out)
    if not isinstance(models, (list, tuple)) or not models:
        raise TypeError(f"models must be a non-empty list of tensor lists, found {type(models).__name__}")
    models = [check.tensor_list(f"models[{k}]", m) for k, m in enumerate(models)]
    if not isinstance(weights, (list, tuple)) or len(weights) != len(models):
        raise ValueError(f"weights must be a list of {len(models)} numbers (one per model), found {weights!r}")
    weights = [check.check_scalar(f"weights[{k}]", w, minimum=0.0) for k, w in enumerate(weights)]
    sources = [("models", models)]
    if fisher is not None:
        if not isinstance(fisher, (list, tuple)) or len(fisher) != len(models):
            raise ValueError(f"fisher must be a list of {len(models)} tensor lists (one per model)")
        fisher = [check.tensor_list(f"fisher[{k}]", f) for k, f in enumerate(fisher)]
        floors = [0.0] * len(models) if floors is None else floors
        if not isinstance(floors, (list, tuple)) or len(floors) != len(models):
            raise ValueError(f"floors must be a list of {len(models)} numbers (one per model), found {floors!r}")
        floors = [check.check_scalar(f"floors[{k}]", f, minimum=0.0) for k, f in enumerate(floors)]
        sources.append(("fisher", fisher))
    elif floors is not None:
        raise ValueError("floors applies to the Fisher; pass fisher as well")
    device = out[0].device if out else None
    for name, lists in sources:
        for k, tensors in enumerate(lists):
            if len(tensors) != len(out):
                raise ValueError(f"{name}[{k}] has {len(tensors)} tensors but out has {len(out)}")
            for i, (t, o) in enumerate(zip(tensors, out)):
                if t.shape != o.shape:
                    raise ValueError(f"{name}[{k}][{i}] has shape {tuple(t.shape)}; expected {tuple(o.shape)}")
                if t.device != device:
                    raise ValueError(f"{name}[{k}][{i}] is on {t.device} but out[0] is on {device}")
                check.check_dtype(f"{name}[{k}]", i, t, check.FLOAT_DTYPES)
    check.check_one_device("out", out)
    for i, o in enumerate(out):
        check.check_dtype("out", i, o, check.FLOAT_DTYPES)
    if not torch.compiler.is_compiling():  # (check_writes is skipped there too: no data pointers while tracing)
        # a source that is out[i] itself is read and written element by element (safe); any other overlap is not
        read = [(f"{name}[{k}]", [t for t, o in zip(ts, out) if not _same_tensor(t, o)]) for name, lists in sources
                for k, ts in enumerate(lists)]  # fmt: skip
        check.check_writes([("out", out)], read)
    return out, models, weights, fisher, floors


def weight_merge_(out, models, weights, *, fisher=None, floors=None, backend="auto"):
    """Writes the merge of K models into ``out`` (a tensor list), in place, in one launch.

    ``models``: K tensor lists shaped like ``out``; ``weights``: K finite numbers >= 0. Without ``fisher``,
    ``out = sum_k weights[k] * models[k]`` (normalise the weights yourself; ``out`` may be one of the models:
    ``weight_merge_(params, [base, params], [1 - a, a])`` is WiSE-FT in place). With ``fisher`` (K tensor lists of
    diagonal Fisher values, >= 0), ``out = sum_k w_k F~_k theta_k / sum_k w_k F~_k`` with ``F~_k = max(F_k,
    floors[k])`` (``floors``: K numbers >= 0, default 0; a denominator of 0 gives NaN, so floor at least one model
    with a positive weight). Every tensor may have its own float dtype; math in fp32. Nothing is written on bad
    input.
    """
    out, models, weights, fisher, floors = _check_inputs(out, models, weights, fisher, floors)
    if not out:
        return
    backend = dispatch.resolve(backend, out[0].device, "weight_merge_")
    if backend == "reference":
        return weight_merge_ref(out, models, weights, fisher, floors)
    flat = [t for m in models for t in m]
    flat_fisher = [] if fisher is None else [t for f in fisher for t in f]
    with torch.no_grad():
        dispatch.native_op("weight_merge", backend)(out, flat, flat_fisher, weights, floors or [])


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("weight_merge", _flavour))(lambda out, models, fisher, weights, floors: None)
