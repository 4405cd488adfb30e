"""PEFT's adapter files both ways: load_peft_adapter reads what ``PeftModel.save_pretrained`` writes, and
save_peft_adapter writes what ``PeftModel.from_pretrained(base, path)`` loads.

The files: ``adapter_config.json`` (a LoraConfig) and ``adapter_model.safetensors`` (or PEFT's older
``adapter_model.bin``) with keys ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r), as LoRALinear holds them. PEFT's ``fan_in_fan_out`` carries no information of its own: PEFT sets it
from each module's type (True for Conv1D, False for nn.Linear), as LoRALinear does.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch

from fastforget.lora import lora_modules

_PEFT_PREFIX = "base_model.model."  # how PEFT's save_pretrained names the wrapped model's parameters
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"
# transformers' model class suffixes -> PEFT's task_type (what PeftModel.from_pretrained needs to pick its class)
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM"}  # fmt: skip


def _pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "PEFT's adapter_model.safetensors needs the safetensors package: pip install safetensors"
        ) from error
    return safetensors.torch


def _read_peft_weights(path):
    if (path / _WEIGHTS).exists():
        return _safetensors().load_file(path / _WEIGHTS)
    if (path / "adapter_model.bin").exists():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither {_WEIGHTS} nor adapter_model.bin")


def load_peft_adapter(model, path):
    """Load a LoRA adapter saved by PEFT's ``save_pretrained`` (``adapter_config.json`` and
    ``adapter_model.safetensors`` or ``.bin``) into ``model`` prepared with ``apply_lora`` on the same modules.

    Sets each LoRALinear's weights, alpha (``lora_alpha`` / ``alpha_pattern``), rsLoRA flag and dropout, so that
    the model computes what PEFT's would. Everything is checked before anything is loaded: an adapter for
    another set of modules, other shapes, or PEFT features that change the formula (DoRA, trained biases,
    modules_to_save) raise ``ValueError``. Returns ``model``.
    """
    path = Path(path)
    config = json.loads((path / _CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {config['peft_type']} adapter, not a LoRA one")
    for option, plain in (("use_dora", False), ("bias", "none")):
        if config.get(option, plain) != plain:
            raise ValueError(f"adapter_config.json sets {option}={config[option]!r}; only {plain!r} is supported")
    weights = _read_peft_weights(path)
    modules = dict(lora_modules(model))
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


def _shared(modules, attribute):
    """The one value of `attribute` that every module has (PEFT's config holds one); ValueError otherwise."""
    values = {getattr(module, attribute) for _, module in modules}
    if len(values) > 1:
        raise ValueError(f"save_peft_adapter: the adapters differ in {attribute} ({sorted(values)}), which a PEFT "
                         "LoraConfig holds once for all modules")  # fmt: skip
    return values.pop()


def _pattern(modules, attribute):
    """(the most common value, {escaped module name: value} for the others): PEFT's default and rank/alpha_pattern."""
    common = Counter(getattr(module, attribute) for _, module in modules).most_common(1)[0][0]
    return common, {re.escape(n): getattr(m, attribute) for n, m in modules if getattr(m, attribute) != common}


def _task_type(model):
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def save_peft_adapter(model, path, *, base_model_name_or_path=None):
    """Write ``model``'s LoRA adapters as PEFT's ``save_pretrained`` does: ``path/adapter_config.json`` and
    ``path/adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, path)`` loads into a fresh
    base model (and ``ff.load_peft_adapter`` bitwise).

    The config holds r and lora_alpha (the most common ones, with ``rank_pattern`` / ``alpha_pattern`` for the
    modules that differ), use_rslora, lora_dropout, the adapted modules' full names as target_modules,
    fan_in_fan_out (True when the adapted layers are Conv1D), task_type from a transformers model's class and
    ``base_model_name_or_path`` (default: the model's ``name_or_path``, when it has one). ``ValueError``, with
    nothing written, for a model without adapters, adapters that differ in dropout or rsLoRA (one value in a PEFT
    config), or a ``path`` that is an existing file. Returns the directory as a ``Path``.
    """
    save_file = _safetensors().save_file
    path = Path(path)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_peft_adapter: the model has no LoRA adapter (ff.apply_lora adds them)")
    if any(not name for name, _ in modules):
        raise ValueError("save_peft_adapter: the model is itself a LoRALinear; save the model that contains it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_peft_adapter: {path} exists and is not a directory")
    r, rank_pattern = _pattern(modules, "r")
    alpha, alpha_pattern = _pattern(modules, "alpha")
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": _shared(modules, "use_rslora"),
        "lora_dropout": _shared(modules, "dropout"),
        "target_modules": sorted(name for name, _ in modules),
        "fan_in_fan_out": any(module.fan_in_fan_out for _, module in modules),
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    weights = {
        f"{_PEFT_PREFIX}{name}.{which}.weight": getattr(module, which).detach().contiguous()
        for name, module in modules
        for which in ("lora_A", "lora_B")
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, path / _WEIGHTS, metadata={"format": "pt"})
    (path / _CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
