"""LoRA modules on the fused op: LoRALinear, apply_lora, lora_state_dict, merge_lora, load_peft_adapter.

Names, initialisation and scaling follow PEFT: an adapted nn.Linear becomes a LoRALinear that keeps the frozen
original as ``base_layer`` and adds ``lora_A`` (r, in_features), Kaiming-uniform with a = sqrt(5), and ``lora_B``
(out_features, r), zeros, so that a fresh adapter leaves the model's outputs unchanged. The LoRA branch is scaled
by alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023) and its input goes through dropout, as in PEFT.
"""

import json
import math
import numbers
import re
from pathlib import Path

import torch
from torch import nn

from fastforget.dispatch import BACKENDS
from fastforget.ops.lora_linear import lora_linear

_PEFT_PREFIX = "base_model.model."  # how PEFT's save_pretrained names the wrapped model's parameters


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_B(lora_A(dropout(x)))`` for a frozen ``base`` nn.Linear, computed by ff.lora_linear.

    ``merge()`` folds the adapter into the base weight (forward is then the plain base layer) and ``unmerge()``
    takes it out again, each exact up to one rounding to the weight's dtype. ``backend`` may be changed at any
    time.
    """

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, not a {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.base_layer = base.requires_grad_(False)
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.dropout, self.use_rslora = int(r), alpha, float(dropout), bool(use_rslora)
        self.backend = backend
        self.merged = False

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        if value not in ("auto", *BACKENDS):
            raise ValueError(f"unknown backend {value!r}; expected one of {('auto',) + BACKENDS}")
        self._backend = value

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def forward(self, x):
        base = self.base_layer
        if self.merged:
            return base(x)
        return lora_linear(
            x, base.weight, base.bias, self.lora_A, self.lora_B, self.scale, self.dropout, self.training,
            backend=self.backend,
        )  # fmt: skip

    @torch.no_grad()
    def _shift_weight(self, sign):
        """weight += sign * scale * B A, computed in fp32 (fp64 for fp64) and rounded once to the weight's dtype."""
        weight = self.base_layer.weight
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)
        weight.copy_(weight.to(acc).add_(delta, alpha=sign * self.scale))

    def merge(self):
        """Fold the adapter into the base weight: W += scale * B A."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        self._shift_weight(+1)
        self.merged = True

    def unmerge(self):
        """Take the adapter out of the base weight again: W -= scale * B A."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self._shift_weight(-1)
        self.merged = False

    def extra_repr(self):
        return (
            f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}, use_rslora={self.use_rslora}, "
            f"merged={self.merged}, backend={self.backend!r}"
        )


def _name_matches(name, targets):
    """PEFT's rule: a target names a module by its full name or by its last dot-separated parts."""
    return any(name == target or name.endswith("." + target) for target in targets)


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(model, target_modules=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, use_rslora=False, *,
               backend="auto"):  # fmt: skip
    """Replace the matching nn.Linear submodules of ``model`` by LoRALinear, in place; freeze everything else.

    ``target_modules`` is a list of names (matched as in PEFT: ``"q_proj"`` matches ``layers.0.attn.q_proj``,
    ``"0"`` a Sequential's first child) or a predicate ``(name, module) -> bool``. Every matched module must be an
    nn.Linear (``TypeError`` naming it otherwise); matching nothing raises ``ValueError``. Returns ``model``.
    """
    if isinstance(target_modules, str):
        raise TypeError("target_modules must be a list of module names or a predicate, not a str")
    targets = None if callable(target_modules) else list(target_modules)
    adapted, chosen = [], []
    for name, module in model.named_modules():
        inside = any(not prefix or name.startswith(prefix + ".") for prefix in adapted)  # an adapter's base layer
        if isinstance(module, LoRALinear):
            adapted.append(name)
        if not name or inside:
            continue
        if not (target_modules(name, module) if targets is None else _name_matches(name, targets)):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: {name!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"apply_lora: {name!r} is a {type(module).__name__}, not an nn.Linear")
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"apply_lora: no submodule of the model matches target_modules {target_modules!r}")
    model.requires_grad_(False)
    for name, module in chosen:
        _replace(model, name, LoRALinear(module, r, alpha, dropout, use_rslora, backend))
    return model


def _lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """The adapter weights only: ``{"<module>.lora_A": A, "<module>.lora_B": B}`` (detached, not copied).

    The keys are those of ``model.state_dict()``: ``model.load_state_dict(sd, strict=False)`` loads them back."""
    return {
        (f"{name}.{key}" if name else key): tensor.detach()
        for name, module in _lora_modules(model)
        for key, tensor in (("lora_A", module.lora_A), ("lora_B", module.lora_B))
    }


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back in its place. Returns ``model``
    (or the merged nn.Linear when ``model`` itself is a LoRALinear)."""
    for name, module in _lora_modules(model):
        if not module.merged:
            module.merge()
        if not name:
            return module.base_layer
        _replace(model, name, module.base_layer)
    return model


def _pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _read_peft_weights(path):
    if (path / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file  # optional dependency: pip install safetensors

        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").exists():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither adapter_model.safetensors nor adapter_model.bin")


def load_peft_adapter(model, path):
    """Load a LoRA adapter saved by PEFT's ``save_pretrained`` (``adapter_config.json`` and
    ``adapter_model.safetensors`` or ``.bin``) into ``model`` prepared with ``apply_lora`` on the same modules.

    Sets each LoRALinear's weights, alpha (``lora_alpha`` / ``alpha_pattern``), rsLoRA flag and dropout, so that
    the model computes what PEFT's would. Everything is checked before anything is loaded: an adapter for
    another set of modules, other shapes, or PEFT features that change the formula (DoRA, trained biases,
    fan_in_fan_out, modules_to_save) raise ``ValueError``. Returns ``model``.
    """
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {config['peft_type']} adapter, not a LoRA one")
    for option, plain in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(option, plain) != plain:
            raise ValueError(f"adapter_config.json sets {option}={config[option]!r}; only {plain!r} is supported")
    weights = _read_peft_weights(path)
    modules = dict(_lora_modules(model))
    loaded = {}
    for key, tensor in weights.items():
        match = re.fullmatch(re.escape(_PEFT_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
        if not match:
            raise ValueError(f"unsupported adapter key {key!r} (only LoRA A/B weights can be loaded)")
        name, which = match.groups()
        if name not in modules:
            raise ValueError(f"the adapter has weights for {name!r}, which is not a LoRALinear of the model")
        target = getattr(modules[name], which)
        if tensor.shape != target.shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)} but {name}.{which} has {tuple(target.shape)}")
        if modules[name].merged:
            raise ValueError(f"{name!r} is merged: unmerge it before loading an adapter")
        loaded[(name, which)] = tensor
    missing = [f"{name}.{which}" for name in modules for which in ("lora_A", "lora_B") if (name, which) not in loaded]
    if missing:
        raise ValueError(f"the adapter has no weights for {', '.join(missing)}")
    with torch.no_grad():
        for (name, which), tensor in loaded.items():
            getattr(modules[name], which).copy_(tensor)
    for name, module in modules.items():
        module.alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        module.use_rslora = bool(config.get("use_rslora", False))
        module.dropout = float(config.get("lora_dropout", 0.0))
    return model
