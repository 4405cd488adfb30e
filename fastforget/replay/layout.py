"""The structure of a replay batch: a tensor, a tuple or a dict of parts sharing their first (batch) dimension; a part
is a tensor or a list of per-example tensors of varying length (ragged sequences). ``split`` checks a batch on its
own, ``Layout`` is the structure every batch of a buffer shares (fixed by the first non-empty one)."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fastforget._validation import check_bool, check_choice, check_int

KINDS = ("tensor", "tuple", "dict")


def corrupt(what: str) -> ValueError:
    return ValueError(f"corrupt ReplayBuffer state: {what}")


@dataclass(frozen=True)
class Spec:
    """A part of a batch: a tensor (``ragged`` False; ``shape`` past the batch dimension) or a list of per-example
    tensors (``ragged`` True; ``shape`` past each example's own first, variable, dimension)."""

    ragged: bool
    dtype: torch.dtype
    shape: tuple[int, ...]

    @staticmethod
    def of(part) -> "Spec | None":
        """The spec of a checked part (None for an empty list, whose spec is unknown)."""
        if isinstance(part, list):
            return Spec(True, part[0].dtype, tuple(part[0].shape[1:])) if part else None
        return Spec(False, part.dtype, tuple(part.shape[1:]))

    def example_bytes(self) -> int:
        """Bytes of one stored example of a tensor part (0 for a ragged part, whose examples vary)."""
        if self.ragged:
            return 0
        return self.dtype.itemsize * torch.Size(self.shape).numel()

    def to_state(self) -> dict:
        return {"ragged": self.ragged, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}

    @staticmethod
    def from_state(state) -> "Spec":
        if not isinstance(state, Mapping) or set(state) != {"ragged", "dtype", "shape"}:
            raise corrupt(f"a part's spec must be a dict of ragged, dtype and shape, got {state!r}")
        dtype = getattr(torch, state["dtype"], None) if isinstance(state["dtype"], str) else None
        if not isinstance(dtype, torch.dtype):
            raise corrupt(f"unknown dtype {state['dtype']!r}")
        if not isinstance(state["shape"], list | tuple):
            raise corrupt(f"a part's shape must be a list, got {state['shape']!r}")
        shape = tuple(check_int("a part's shape", size, minimum=0) for size in state["shape"])
        return Spec(check_bool("a part's ragged", state["ragged"]), dtype, shape)


def part_name(kind: str, key) -> str:
    return "the batch" if kind == "tensor" else f"batch[{key!r}]"


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} is a {type(t).__name__}; parts are tensors or lists of tensors")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")
    if t.dim() == 0:
        raise ValueError(f"{name} is 0-dimensional; it needs a first (batch or length) dimension")


def _check_part(name: str, part) -> None:
    if not isinstance(part, list):
        _check_tensor(name, part)
        return
    for i, item in enumerate(part):
        _check_tensor(f"{name}[{i}]", item)
        if item.dtype != part[0].dtype:
            raise TypeError(f"{name}[{i}] has dtype {item.dtype} but {name}[0] has {part[0].dtype}")
        if item.shape[1:] != part[0].shape[1:]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(item.shape)} but {name}[0] has {tuple(part[0].shape)}: ragged "
                "examples may differ in their first dimension only"
            )


def split(batch) -> tuple[str, tuple, list, int]:
    """(kind, keys, parts, batch size) of a batch, every part checked on its own."""
    if isinstance(batch, torch.Tensor):
        kind, keys, parts = "tensor", (None,), [batch]
    elif isinstance(batch, tuple):
        kind, keys, parts = "tuple", tuple(range(len(batch))), list(batch)
    elif isinstance(batch, Mapping):
        kind, keys, parts = "dict", tuple(batch), list(batch.values())
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"dict batch keys must be strings, got {key!r}")
    else:
        hint = " (pass tuple(batch) for a list of parts)" if isinstance(batch, list) else ""
        raise TypeError(f"a batch is a Tensor, a tuple or a dict of parts, not a {type(batch).__name__}{hint}")
    if not parts:
        raise ValueError("a batch needs at least one part")
    for key, part in zip(keys, parts):
        _check_part(part_name(kind, key), part)
    sizes = [len(part) for part in parts]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{part_name(kind, key)} has {size}" for key, size in zip(keys, sizes))
        raise ValueError(f"batch parts have different first dimensions: {listed}")
    return kind, keys, parts, sizes[0]


@dataclass(frozen=True)
class Layout:
    """The structure every batch of a buffer shares: kind ("tensor", "tuple" or "dict"), keys, one spec per part."""

    kind: str
    keys: tuple
    specs: tuple[Spec, ...]

    @staticmethod
    def of(kind: str, keys: tuple, parts: list) -> "Layout":
        return Layout(kind, keys, tuple(Spec.of(part) for part in parts))

    def names(self) -> list[str]:
        return [part_name(self.kind, key) for key in self.keys]

    def example_bytes(self) -> int:
        """Bytes of one example's tensor parts (ragged parts are allocated per example, as they come)."""
        return sum(spec.example_bytes() for spec in self.specs)

    def align(self, kind: str, keys: tuple, parts: list) -> list:
        """The parts in this layout's order, after checking that they match it (a dict's key order is free)."""
        if kind != self.kind:
            raise TypeError(f"the buffer holds {self.kind} batches; got a {kind} batch")
        if keys != self.keys:
            if kind != "dict" or set(keys) != set(self.keys):
                raise ValueError(f"the buffer holds batches with parts {list(self.keys)}; got {list(keys)}")
            parts = [dict(zip(keys, parts))[key] for key in self.keys]
        for name, spec, part in zip(self.names(), self.specs, parts):
            got = Spec.of(part)
            if got is None:
                continue
            if got.ragged != spec.ragged:
                held = "lists of tensors" if spec.ragged else "tensors"
                raise TypeError(f"{name} is a {'list' if got.ragged else 'tensor'} but the buffer holds {held} there")
            if got.dtype != spec.dtype:
                raise TypeError(f"{name} has dtype {got.dtype} but the buffer holds {spec.dtype}")
            if got.shape != spec.shape:
                shapes = f"{got.shape} (past the first dimension) but the buffer holds {spec.shape}"
                raise ValueError(f"{name} has examples of shape {shapes}")
        return parts

    def rebuild(self, parts: list):
        """A batch of this layout's kind from its parts."""
        if self.kind == "tensor":
            return parts[0]
        return tuple(parts) if self.kind == "tuple" else dict(zip(self.keys, parts))

    def to_state(self) -> dict:
        return {"kind": self.kind, "keys": list(self.keys), "specs": [spec.to_state() for spec in self.specs]}

    @staticmethod
    def from_state(state) -> "Layout":
        if not isinstance(state, Mapping) or set(state) != {"kind", "keys", "specs"}:
            raise corrupt(f"the layout must be a dict of kind, keys and specs, got {state!r}")
        kind = check_choice("the layout's kind", state["kind"], KINDS)
        if not isinstance(state["keys"], list | tuple) or not isinstance(state["specs"], list | tuple):
            raise corrupt("the layout's keys and specs must be lists")
        keys = {"tensor": (None,), "tuple": tuple(range(len(state["specs"]))), "dict": tuple(state["keys"])}[kind]
        if list(state["keys"]) != list(keys) or len(keys) != len(state["specs"]):
            raise corrupt(f"layout keys {state['keys']!r} for {len(state['specs'])} {kind} parts")
        if not state["specs"] or (kind == "dict" and not all(isinstance(key, str) for key in keys)):
            raise corrupt(f"layout keys {state['keys']!r}: a batch has at least one part, dict keys are strings")
        return Layout(kind, keys, tuple(Spec.from_state(spec) for spec in state["specs"]))
