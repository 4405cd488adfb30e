"""LoRA modules on the fused op: LoRALinear, apply_lora, lora_state_dict, merge_lora, lora_disabled.

Names, initialisation and scaling follow PEFT: an adapted layer becomes a LoRALinear that keeps the frozen
original as ``base_layer`` and adds ``lora_A`` (r, in_features), Kaiming-uniform with a = sqrt(5), and ``lora_B``
(out_features, r), zeros, so that a fresh adapter leaves the model's outputs unchanged. The LoRA branch is scaled
by alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023) and its input goes through dropout, as in PEFT.

Three kinds of base layer: ``nn.Linear``; transformers' ``Conv1D`` (GPT-2; weight stored (in, out), PEFT's
``fan_in_fan_out``: the op reads it transposed, a view); and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
(QLoRA: the quantized layer computes its output and the rank-r branch is added into it in place,
fastforget/lora_quantized.py). transformers and bitsandbytes are never imported here: a layer of theirs can only
exist once they are, so their classes are looked up in ``sys.modules``.
"""

import contextlib
import math
import numbers
import sys

import torch
from torch import nn

from fastforget import _validation as check
from fastforget.dispatch import BACKENDS
from fastforget.lora_quantized import add_lora_
from fastforget.ops.lora_linear import lora_linear

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
_SUPPORTED = "nn.Linear, transformers' Conv1D, bitsandbytes' Linear4bit and Linear8bitLt"


def _conv1d_class():
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _quantized_classes():
    module = sys.modules.get("bitsandbytes.nn")
    return () if module is None else (module.Linear4bit, module.Linear8bitLt)


def base_kind(module):
    """'linear', 'conv1d' (transformers' Conv1D), 'quantized' (bitsandbytes) or None for any other module.

    ``TypeError`` for a quantized linear layer of a kind LoRALinear cannot adapt (another bitsandbytes class, or an
    nn.Linear whose weight is not floating point)."""
    conv1d = _conv1d_class()
    if isinstance(module, _quantized_classes()):
        return "quantized"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if not isinstance(module, nn.Linear):
        return None
    if type(module).__module__.startswith("bitsandbytes") or not module.weight.dtype.is_floating_point:
        raise TypeError(
            f"{type(module).__name__} (weight {module.weight.dtype}) is a quantized linear layer that fastforget's "
            f"LoRA does not support; supported base layers: {_SUPPORTED}"
        )
    return "linear"


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_B(lora_A(dropout(x)))`` for a frozen ``base`` layer, computed by ff.lora_linear.

    ``base`` is an nn.Linear, a transformers Conv1D (``fan_in_fan_out``: its weight is (in, out)) or a bitsandbytes
    Linear4bit / Linear8bitLt (``quantized``). ``merge()`` folds the adapter into the base weight (forward is then
    the plain base layer) and ``unmerge()`` takes it out again, each exact up to one rounding to the weight's dtype;
    a quantized base refuses both. Under ``ff.lora_disabled`` the layer computes its base output only.
    ``backend`` may be changed at any time.
    """

    def __init__(self, base: nn.Module, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"LoRALinear adapts an nn.Linear, not a {type(base).__name__} (supported: {_SUPPORTED})")
        _check_adapter(r, alpha, dropout, use_rslora, backend)
        self.fan_in_fan_out, self.quantized = kind == "conv1d", kind == "quantized"
        self.base_layer = base.requires_grad_(False)
        if kind == "conv1d":
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight
        dtype = torch.float32 if self.quantized else weight.dtype  # PEFT keeps a quantized layer's adapter fp32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.dropout, self.use_rslora = int(r), alpha, float(dropout), bool(use_rslora)
        self.backend = backend
        self.merged = False
        self.disabled = False  # set by ff.lora_disabled

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        _check_backend(value)
        self._backend = value

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def weight(self):
        """The base layer's weight as it stores it (as PEFT's layers expose it, for code that reads
        ``module.weight.dtype``); ``linear_weight()`` gives it as (out, in)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def linear_weight(self):
        """The base weight as nn.Linear holds it, (out, in): a Conv1D's (in, out) weight transposed (a view)."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def forward(self, x):
        base = self.base_layer
        if self.merged or self.disabled:
            return base(x)
        if self.quantized:
            return add_lora_(base(x), x, self.lora_A, self.lora_B, self.scale, self.dropout, self.training)
        return lora_linear(
            x, self.linear_weight(), base.bias, self.lora_A, self.lora_B, self.scale, self.dropout, self.training,
            backend=self.backend,
        )  # fmt: skip

    @torch.no_grad()
    def _shift_weight(self, sign):
        """weight += sign * scale * B A, computed in fp32 (fp64 for fp64) and rounded once to the weight's dtype."""
        if self.quantized:
            raise RuntimeError(
                f"cannot merge a LoRA adapter into a quantized {type(self.base_layer).__name__}: dequantize it "
                "into an nn.Linear (fastforget.lora_quantized.dequantized_linear(layer.base_layer)), put an adapter "
                "with these weights on it and merge there, then requantize the merged layer if needed"
            )
        weight = self.linear_weight()
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)
        weight.copy_(weight.to(acc).add_(delta, alpha=sign * self.scale))

    def merge(self):
        """Fold the adapter into the base weight: W += scale * B A."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        if self.disabled:
            raise RuntimeError("this LoRALinear is disabled (ff.lora_disabled): merge it outside that context")
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
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}, use_rslora={self.use_rslora}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, quantized={self.quantized}, merged={self.merged}, "
            f"backend={self.backend!r}"
        )


def _name_matches(name, targets):
    """PEFT's rule: a target names a module by its full name or by its last dot-separated parts."""
    return any(name == target or name.endswith("." + target) for target in targets)


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def all_linear_names(model):
    """The modules PEFT's ``target_modules="all-linear"`` selects (peft.tuners.tuners_utils.
    _maybe_include_all_linear_layers): every nn.Linear (quantized ones included) and Conv1D, and every existing
    adapter, but not the layers inside an adapter nor a transformers model's output embeddings (the LM head)."""
    conv1d = _conv1d_class()
    classes = (nn.Linear, LoRALinear) + ((conv1d,) if conv1d is not None else ())
    names = {name for name, module in model.named_modules() if isinstance(module, classes)}
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        head = model.get_output_embeddings()
        names -= {name for name, module in model.named_modules() if module is head}
    for prefix, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names -= {f"{prefix}.{suffix}" if prefix else suffix for suffix, _ in module.named_modules() if suffix}
    return names


def _check_adapter(r, alpha, dropout, use_rslora, backend):
    """The adapter's hyperparameters, checked before anything (a layer, a model) is changed."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    check.check_bool("use_rslora", use_rslora)
    _check_backend(backend)


def _check_backend(backend):
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")


def apply_lora(model, target_modules=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, use_rslora=False, *,
               backend="auto"):  # fmt: skip
    """Replace the matching linear submodules of ``model`` by LoRALinear, in place; freeze everything else.

    ``target_modules`` is a list of names (matched as in PEFT: ``"q_proj"`` matches ``layers.0.attn.q_proj``,
    ``"0"`` a Sequential's first child), ``"all-linear"`` (PEFT's selection: every nn.Linear, Conv1D and quantized
    linear layer but a transformers model's output head) or a predicate ``(name, module) -> bool``. Every matched
    module must be an nn.Linear, a transformers Conv1D or a bitsandbytes Linear4bit / Linear8bitLt (``TypeError``
    naming it otherwise); matching nothing raises ``ValueError``. Returns ``model``. A rejected call leaves the
    model as it was (nothing frozen, nothing replaced).
    """
    _check_adapter(r, alpha, dropout, use_rslora, backend)
    if isinstance(target_modules, str):
        if target_modules.lower() != ALL_LINEAR:
            raise TypeError(
                f"target_modules must be a list of module names, a predicate or {ALL_LINEAR!r}, not a str "
                f"({target_modules!r}; a single name goes in a list)"
            )
        target_modules = all_linear_names(model)
        if not target_modules:
            raise ValueError(f"apply_lora: {ALL_LINEAR!r} found no linear layer in the model ({_SUPPORTED})")
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
        try:
            kind = base_kind(module)
        except TypeError as error:
            raise TypeError(f"apply_lora: {name!r}: {error}") from None
        if kind is None:
            raise TypeError(f"apply_lora: {name!r} is a {type(module).__name__}, not an nn.Linear ({_SUPPORTED})")
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"apply_lora: no submodule of the model matches target_modules {target_modules!r}")
    model.requires_grad_(False)
    for name, module in chosen:
        adapter = LoRALinear(module, r, alpha, dropout, use_rslora, backend)
        _replace(model, name, adapter.train(module.training))  # an adapter in an eval() model starts in eval
    return model


def lora_modules(model):
    """``[(name, LoRALinear)]`` of ``model``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """The adapter weights only: ``{"<module>.lora_A": A, "<module>.lora_B": B}`` (detached, not copied).

    The keys are those of ``model.state_dict()``: ``model.load_state_dict(sd, strict=False)`` loads them back."""
    return {
        (f"{name}.{key}" if name else key): tensor.detach()
        for name, module in lora_modules(model)
        for key, tensor in (("lora_A", module.lora_A), ("lora_B", module.lora_B))
    }


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain base layer back in its place. Returns ``model``
    (or the merged base layer when ``model`` itself is a LoRALinear). A quantized base raises before anything
    is merged."""
    modules = lora_modules(model)
    quantized = [name or "the model" for name, module in modules if module.quantized and not module.merged]
    if quantized:
        raise RuntimeError(
            f"merge_lora: {quantized[0]!r} has a quantized base layer, which cannot hold a merged adapter: "
            "dequantize it into an nn.Linear first (fastforget.lora_quantized.dequantized_linear); nothing was merged"
        )
    if any(module.disabled for _, module in modules):
        raise RuntimeError("merge_lora: the adapters are disabled (ff.lora_disabled); merge outside that block")
    for name, module in modules:
        if not module.merged:
            module.merge()
        if not name:
            return module.base_layer
        _replace(model, name, module.base_layer)
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Within the block every LoRALinear of ``model`` computes its base layer's output only (PEFT's
    ``disable_adapter()``); the adapters, their gradients and the optimizer state are not touched. ``ValueError``,
    before anything changes, when ``model`` has no adapter or one of them is merged (unmerge it first). Nests."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("lora_disabled: the model has no LoRA adapter (ff.apply_lora adds them)")
    merged = [name or "the model" for name, module in modules if module.merged]
    if merged:
        raise ValueError(f"lora_disabled: {merged[0]!r} is merged into its base weight; unmerge it first")
    before = [module.disabled for _, module in modules]
    for _, module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for (_, module), state in zip(modules, before):
            module.disabled = state
