"""Per-sample gradients from per-layer hooks on one ordinary backward pass, squared (or made absolute) and summed
layer by layer into the Fisher, without B per-sample copies of the model's gradients.

A layer's per-sample gradient is a function of its input x and of the gradient g at its output (Goodfellow 2015,
"Efficient per-example gradient computations"; the rules Opacus' grad samplers and BackPACK implement): for a
linear-family layer y_t = W x_t + b applied at positions t of sample s, dW_s = sum_t g_st x_st^T and
db_s = sum_t g_st. The backward therefore only needs the activations' gradients: the parameters are frozen during
the pass (no weight-gradient matmul, no ``.grad`` touched), a forward hook keeps each layer's input and a hook on
its output receives g. Rules:

* ``nn.Linear`` (PEFT's LoRA layers are made of them: ``lora_A`` / ``lora_B``) and GPT-2's ``Conv1D`` (weight
  (in, out): dW_s = sum_t x_st g_st^T): the formula above, in fp32, a chunk of samples at a time.
* fastforget's ``LoRALinear`` (y = base(x) + s B A x): dB_s = s sum_t g_st (A x_st)^T, dA_s = s sum_t (B^T g_st) x_st^T.
* ``nn.Embedding`` (plain lookups): dE_s[v] = sum_{t: id_st = v} g_st, one row per distinct token of the sample
  (none for ``padding_idx``), added to F's rows with ``index_add_``.
* any other leaf module called with one tensor (RMSNorm, LayerNorm, subclasses of the above): the vector-Jacobian
  product of the module alone at each sample's input (``torch.func.vjp`` under ``vmap``).

Per-sample gradients of one layer are materialised ``CHUNK_ELEMENTS`` elements (at least one sample's) at a time and
accumulated by the fused ``fisher_update_``. A parameter that several modules use (tied embeddings) gets its
per-sample gradients summed over them before squaring, in a (batch, *shape) buffer for that parameter only. The
rules need each example to be processed on its own (the model is in eval mode, its layers see dim 0 as the example
dimension); a call that breaks this (a layer input whose dim 0 is not the batch, a module called twice in one
forward, another call signature) raises ``Unsupported`` during the forward, before anything is added, and the
caller falls back to torch.func.
"""

import functools
import sys

import torch
from torch.func import functional_call, vjp, vmap

from fastforget.ops.fisher_update import fisher_update_

CHUNK_ELEMENTS = 1 << 22  # per-sample gradient elements of one layer held at once (16 MiB in fp32)


class Unsupported(Exception):
    """This model (or this call) cannot be split into per-sample gradients by layer hooks."""


def _conv1d_class():
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(pytorch_utils, "Conv1D", None)


def _positions(t, rows):
    """(k, positions, features) view of a (batch, ..., features) tensor's examples `rows`, in fp32."""
    t = t[rows]
    return t.reshape(len(t), -1, t.shape[-1]).float()


def linear_grads(module, x, g, rows):
    x, g = _positions(x, rows), _positions(g, rows)
    yield module.weight, g.transpose(1, 2) @ x
    if module.bias is not None:
        yield module.bias, g.sum(1)


def conv1d_grads(module, x, g, rows):
    x, g = _positions(x, rows), _positions(g, rows)
    yield module.weight, x.transpose(1, 2) @ g
    yield module.bias, g.sum(1)


def lora_grads(module, x, g, rows):
    if module.merged or module.disabled:  # the adapter is not in the forward
        return
    x, g = _positions(x, rows), _positions(g, rows)
    a, b = module.lora_A.float(), module.lora_B.float()
    yield module.lora_B, module.scale * (g.transpose(1, 2) @ (x @ a.t()))
    yield module.lora_A, module.scale * ((g @ b).transpose(1, 2) @ x)


def embedding_grads(module, ids, g, rows):
    """Sparse: (param, samples, rows, values), one entry per distinct (sample, token)."""
    ids, g = ids[rows], g[rows]
    k, vocab = len(ids), module.num_embeddings
    ids, g = ids.reshape(k, -1), g.reshape(k, ids[0].numel(), -1).float()
    keys = (torch.arange(k, device=ids.device)[:, None] * vocab + ids).flatten()
    if module.padding_idx is not None:  # torch's embedding gives the padding row no gradient
        keep = ids.flatten() != module.padding_idx
        keys, g = keys[keep], g.reshape(-1, g.shape[-1])[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    values = g.new_zeros(len(unique), g.shape[-1]).index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
    yield module.weight, (unique // vocab, unique % vocab, values)


def module_grads(module, x, g, rows, names):
    """Any leaf module: per-sample vector-Jacobian products of the module alone (its parameters `names`)."""
    weights = {n: getattr(module, n).detach() for n in names}

    def one(x_s, g_s):
        _, pullback = vjp(lambda w: functional_call(module, w, (x_s.unsqueeze(0),)), weights)
        return pullback(g_s.unsqueeze(0))[0]

    grads = vmap(one)(x[rows], g[rows])
    for n in names:
        yield getattr(module, n), grads[n].float()


def rule_for(module, own):
    """The per-sample gradient rule for `module`, whose direct parameters `own` are protected; None if none fits."""
    kind = type(module)
    if kind is torch.nn.Linear:
        return linear_grads
    if kind is _conv1d_class():
        return conv1d_grads
    from fastforget.lora import LoRALinear

    if isinstance(module, LoRALinear):
        return lora_grads if all(p is module.lora_A or p is module.lora_B for p in own) else None
    if kind is torch.nn.Embedding:
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return embedding_grads
    if next(module.children(), None) is not None or isinstance(
        module, (torch.nn.ParameterList, torch.nn.ParameterDict)
    ):
        return None
    names = [n for n, p in module.named_parameters(recurse=False) if any(p is q for q in own)]
    return functools.partial(module_grads, names=names)


class LayerHooks:
    """Adds sum_s w_s g_s^2 (MAS: sum_s |g_s|) over a batch's examples to `fisher` from one backward pass."""

    def __init__(self, model, tensors, fisher, absolute, backend):
        self.model, self.absolute, self.backend = model, absolute, backend
        self.fisher = {id(p): f for p, f in zip(tensors, fisher)}
        owners = {}
        self.rules = []  # (module, rule, chunk)
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self.fisher]
            if not own:
                continue
            rule = rule_for(module, own)
            if rule is None:
                raise Unsupported(f"no per-sample rule for {type(module).__name__}")
            for p in own:
                owners[id(p)] = owners.get(id(p), 0) + 1
            self.rules.append((module, rule, max(1, CHUNK_ELEMENTS // max(p.numel() for p in own))))
        if len(owners) != len(self.fisher):
            raise Unsupported("a protected parameter belongs to no module of the model")
        self.shared = {key for key, n in owners.items() if n > 1}  # summed over modules before squaring
        self.active = False

    def add(self, objectives, batch, size):
        """objectives(batch) yields (size,) loss vectors, one loss per example, all from one forward of the batch;
        each one's backward adds its per-example gradients to the Fisher."""
        self.size, self.calls, self.buffers = size, {}, {}
        handles = [
            module.register_forward_hook(functools.partial(self._forward, rule, chunk), with_kwargs=True)
            for module, rule, chunk in self.rules
        ]
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            self.active = True
            with torch.enable_grad():
                pending = None  # one objective ahead: the last backward may free the graph
                for losses in objectives(batch):
                    if pending is not None:
                        self._backward_pass(pending, retain_graph=True)
                    if not losses.requires_grad:
                        raise Unsupported("no protected layer's output reaches the loss")
                    pending = losses.sum()
                if pending is not None:
                    self._backward_pass(pending, retain_graph=False)
        finally:
            self.active = False
            for p in frozen:
                p.requires_grad_(True)
            for handle in handles:
                handle.remove()
            self.buffers = {}

    def _backward_pass(self, total, retain_graph):
        """One backward, the parameters' tied per-sample gradients squared at its end."""
        total.backward(retain_graph=retain_graph)
        for key, buffer in self.buffers.items():
            fisher_update_([self.fisher[key]], [buffer], absolute=self.absolute, backend=self.backend)
        self.buffers = {}

    def _forward(self, rule, chunk, module, args, kwargs, output):
        if not (self.active and torch.is_grad_enabled()):
            return
        x = args[0] if len(args) == 1 and not kwargs else None
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)):
            raise Unsupported(f"{type(module).__name__} was not called with one tensor returning one tensor")
        if x.dim() == 0 or len(x) != self.size or output.dim() == 0 or len(output) != self.size:
            raise Unsupported(f"{type(module).__name__}'s input or output does not have the batch's examples in dim 0")
        self.calls[module] = self.calls.get(module, 0) + 1
        if self.calls[module] > 1:
            raise Unsupported(f"{type(module).__name__} is called more than once per forward")
        if not output.requires_grad:  # nothing before this layer is differentiated: its backward starts here
            output.requires_grad_(True)
        x = x.detach()
        output.register_hook(lambda g: self._backward(rule, chunk, module, x, g))

    @torch.no_grad()
    def _backward(self, rule, chunk, module, x, g):
        self.active = False  # module_grads calls the module again
        try:
            for start in range(0, self.size, chunk):
                for p, grads in rule(module, x, g, slice(start, start + chunk)):
                    if id(p) in self.fisher:
                        self._add(p, start, grads)
        finally:
            self.active = True

    def _add(self, p, start, grads):
        key, fisher = id(p), self.fisher[id(p)]
        if key in self.shared:
            if key not in self.buffers:
                self.buffers[key] = fisher.new_zeros(self.size, *fisher.shape)
            buffer = self.buffers[key]
            if isinstance(grads, tuple):  # embedding rows
                samples, rows, values = grads
                buffer.view(-1, fisher.shape[-1]).index_add_(0, (start + samples) * fisher.shape[0] + rows, values)
            else:
                buffer[start : start + len(grads)] += grads
        elif isinstance(grads, tuple):
            _, rows, values = grads
            fisher.index_add_(0, rows, values.abs() if self.absolute else values.square())
        else:
            fisher_update_([fisher], [grads], absolute=self.absolute, backend=self.backend)
