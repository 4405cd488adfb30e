"""Whole-model weight averaging: WiSE-FT interpolation and Fisher-weighted merging, one fused launch each.

* ``wise_ft(model, base, alpha)``: theta <- (1 - alpha) theta_0 + alpha theta (Wortsman et al. 2022, "Robust
  fine-tuning of zero-shot models"). In Lin et al.'s study of the alignment tax ("Mitigating the Alignment Tax of
  RLHF", EMNLP 2024) averaging the pre- and post-fine-tuning weights gave the best forgetting trade-off. LoRA
  adapters (fastforget's LoRALinear, PEFT's LoRA layers) are interpolated by scaling them: the base weights are
  theta_0 and stay untouched, so no copy of the base is needed.
* ``fisher_merge(model, sources, weights, fishers)``: theta = sum_k w_k F_k theta_k / sum_k w_k F_k (Matena &
  Raffel 2022, "Merging Models with Fisher-Weighted Averaging"), with their reference implementation's Fisher floor.

Sources are ``nn.Module`` objects, state dicts (name -> tensor) or ``ff.EWC`` objects (their anchors, and Fisher);
parameters are matched by name. Every input is checked before anything is written.

Under FSDP2 (DTensor parameters sharded over a 1-D mesh) each rank merges its local shards: a source's tensor is
sharded like its parameter first (a full tensor as rank 0 holds it, a DTensor resharded), and ``normalize``'s
Fisher norms are summed over the process group, so every rank writes its part of the single-process result.
"""

import torch
import torch.distributed as dist

from fastforget import _validation as check
from fastforget import distributed as dist_util
from fastforget.ewc import EWC
from fastforget.lora import lora_modules
from fastforget.ops.weight_merge import weight_merge_

_ADAPTER_KEYS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _peft_lora_layers(model):
    """PEFT's LoRA layers of `model`, as (name, layer) (none without peft installed)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapter_scales(model):
    """The tensors whose scaling by alpha scales every LoRA update of `model` by alpha: each adapter's B (the update
    is scale * B A; DoRA's magnitude is refused, its update is not linear in B)."""
    modules, peft_layers = lora_modules(model), _peft_lora_layers(model)
    merged = [name for name, m in modules + peft_layers if m.merged]
    if merged:
        raise ValueError(f"wise_ft: the adapter of {merged[0]!r} is merged into its base weight; unmerge it first")
    tensors = [module.lora_B for _, module in modules]
    for _, layer in peft_layers:
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_magnitude_vector", {}):
                raise ValueError(f"wise_ft: adapter {adapter!r} is a DoRA adapter; its update is not linear in B")
            for table in (layer.lora_B, getattr(layer, "lora_embedding_B", {})):
                if adapter in table:
                    b = table[adapter]
                    tensors.append(b.weight if isinstance(b, torch.nn.Module) else b)
    return tensors


def _is_adapter(name):
    return any(f".{key}." in f".{name}." for key in _ADAPTER_KEYS)


def _named_trainable(model):
    """`model`'s trainable (name, parameter) pairs and the process group they are sharded over (None: plain)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, found {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return named, dist_util.check_parameters([n for n, _ in named], [p for _, p in named])


def _shards(params):
    return [dist_util.local(p) for p in params]


def _state(name, source, fisher=False):
    """A source as name -> tensor: its parameters, a state dict, or an EWC object's anchors (fisher: its Fisher)."""
    if isinstance(source, EWC):
        if not source.tasks:
            raise ValueError(f"{name} is an EWC object with nothing consolidated yet (no anchors or Fisher)")
        return dict(zip(source.names, source.fisher_tensors() if fisher else source.anchors))
    if isinstance(source, torch.nn.Module):
        return dict(source.named_parameters())
    if isinstance(source, dict):
        return source
    kind = "a Fisher dict or an EWC object" if fisher else "an nn.Module, a state dict or an EWC object"
    raise TypeError(f"{name} must be {kind}, found {type(source).__name__}")


def _gather(name, state, names, params):
    """state's tensors for `names`, each shaped like its parameter (its local shard under FSDP2), or a ValueError
    naming the first mismatch; every entry is checked before any is sharded (a collective)."""
    tensors = []
    for n, p in zip(names, params):
        t = state.get(n)
        if t is None:
            raise ValueError(f"{name} has no entry {n!r} (a parameter of the model)")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{n!r}] must be a tensor, found {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"{name}[{n!r}] has shape {tuple(t.shape)}; expected {tuple(p.shape)}")
        tensors.append(t.detach())
    return [dist_util.local(dist_util.shard_like(t, p)).to(dist_util.local(p).device) for t, p in zip(tensors, params)]


def wise_ft(model, base=None, alpha=0.5, *, backend="auto"):
    """WiSE-FT: every trainable parameter theta of ``model`` <- (1 - alpha) theta_0 + alpha theta, in place, in one
    launch. ``alpha`` in [0, 1]: 0 gives the base model back, 1 leaves the fine-tuned one.

    ``base`` holds theta_0 by parameter name: the base model (an ``nn.Module``), its state dict (e.g. saved with
    ``{n: p.detach().clone() for n, p in model.named_parameters()}`` before fine-tuning), or an ``ff.EWC`` object
    (its anchors: the parameters at consolidation). LoRA adapters (fastforget's LoRALinear, PEFT's LoRA layers) need
    no base: their update scale * B A is scaled by alpha (B <- alpha B), which is exactly the interpolation between
    the frozen base weights and the adapted ones; ``base`` then covers the other trainable parameters, if any.
    Returns ``model``. Nothing is changed when an argument is rejected.
    """
    alpha = check.check_real("alpha", alpha, minimum=0.0, maximum=1.0)
    named, _ = _named_trainable(model)
    adapters = _adapter_scales(model)
    others = [(n, p) for n, p in named if not _is_adapter(n)]
    if not adapters and not others:
        raise ValueError("wise_ft: the model has no trainable parameters to interpolate")
    names, params = [n for n, _ in others], [p for _, p in others]
    if others and base is None:
        raise ValueError(
            f"wise_ft: base is needed for the trainable parameters that are not LoRA adapters ({names[0]!r}"
            f"{f' and {len(names) - 1} more' if len(names) > 1 else ''})"
        )
    anchors = _gather("base", _state("base", base), names, params) if others else []
    with torch.no_grad():
        if others:
            weight_merge_(_shards(params), [anchors, _shards(params)], [1.0 - alpha, alpha], backend=backend)
        if adapters:
            weight_merge_(_shards(adapters), [_shards(adapters)], [alpha], backend=backend)
    return model


def fisher_merge(model, sources, weights=None, fishers=None, *, fisher_floor=1e-6, favor_first=True,
                 normalize=False, backend="auto"):  # fmt: skip
    """Fisher-weighted merging (Matena & Raffel 2022): writes, into every trainable parameter of ``model``,

        theta = sum_k w_k F~_k theta_k / sum_k w_k F~_k,    F~_k = max(F_k, fisher_floor)

    ``sources``: the K models to merge (``nn.Module``, state dict or ``ff.EWC``: its anchors); ``model`` itself may
    be one of them. ``weights``: K numbers >= 0 (default 1 / K each). ``fishers``: K diagonal Fishers (dicts by
    parameter name, or ``ff.EWC`` objects), or None: each EWC source then brings its own Fisher, and without any
    Fisher the merge is the plain weighted average sum_k w_k theta_k / sum_k w_k. As in the reference
    implementation (mmatena/model_merging), only the first source's Fisher is floored (``favor_first``: where no
    model's Fisher sees a parameter it keeps the first model's value) or, with ``favor_first=False``, every one;
    ``normalize`` divides each w_k by the L2 norm of F_k over the whole model (their ``normalize_fishers``).
    Returns ``model``. Nothing is changed when an argument is rejected.
    """
    named, group = _named_trainable(model)
    if not named:
        raise ValueError("fisher_merge: the model has no trainable parameters to merge into")
    names, params = [n for n, _ in named], [p for _, p in named]
    if not isinstance(sources, (list, tuple)) or not sources:
        raise TypeError("sources must be a non-empty list of models, state dicts or EWC objects")
    k = len(sources)
    weights = [1.0 / k] * k if weights is None else weights
    if not isinstance(weights, (list, tuple)) or len(weights) != k:
        raise ValueError(f"weights must be a list of {k} numbers (one per source), found {weights!r}")
    weights = [check.check_scalar(f"weights[{i}]", w, minimum=0.0) for i, w in enumerate(weights)]
    if sum(weights) <= 0:
        raise ValueError("weights must not all be 0")
    fisher_floor = check.check_scalar("fisher_floor", fisher_floor, minimum=0.0)
    check.check_bool("favor_first", favor_first)
    check.check_bool("normalize", normalize)
    thetas = [_gather(f"sources[{i}]", _state(f"sources[{i}]", s), names, params) for i, s in enumerate(sources)]
    if fishers is None and any(isinstance(s, EWC) for s in sources):
        fishers = [s if isinstance(s, EWC) else None for s in sources]
    if fishers is None:  # the isometric (plain weighted) average
        total = sum(weights)
        with torch.no_grad():
            weight_merge_(_shards(params), thetas, [w / total for w in weights], backend=backend)
        return model
    if not isinstance(fishers, (list, tuple)) or len(fishers) != k:
        raise ValueError(f"fishers must be a list of {k} Fishers (one per source), found {type(fishers).__name__}")
    missing = [i for i, f in enumerate(fishers) if f is None]
    if missing:
        raise ValueError(f"fishers[{missing[0]}] is None: give a Fisher for every source (or none at all)")
    fisher = [_gather(f"fishers[{i}]", _state(f"fishers[{i}]", f, fisher=True), names, params)
              for i, f in enumerate(fishers)]  # fmt: skip
    if favor_first and (weights[0] <= 0 or fisher_floor <= 0):
        raise ValueError("favor_first needs weights[0] > 0 and fisher_floor > 0 (else 0 / 0 where no Fisher sees)")
    if not favor_first and fisher_floor <= 0:
        raise ValueError("fisher_floor must be > 0 (else 0 / 0 where no Fisher sees a parameter)")
    if normalize:
        squares = torch.stack([torch.stack([t.double().square().sum() for t in f]).sum() for f in fisher])
        if group is not None:  # each rank holds its shards' part of every norm
            dist.all_reduce(squares, group=group)
        norms = squares.sqrt().tolist()
        if any(n == 0 for n in norms):
            raise ValueError(f"fishers[{norms.index(0)}] is zero everywhere; it cannot be normalized")
        weights = [w / n for w, n in zip(weights, norms)]
    floors = [fisher_floor] + [0.0 if favor_first else fisher_floor] * (k - 1)
    with torch.no_grad():
        weight_merge_(_shards(params), thetas, weights, fisher=fisher, floors=floors, backend=backend)
    return model
