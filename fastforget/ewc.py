"""The EWC regularizer: Fisher estimation, online or separate consolidation, the fused penalty, and its state.

Modes, with F_t and theta*_t the Fisher and the parameters after task t:

* ``online`` (Schwarz et al. 2018, "Progress & Compress"): F <- decay * F + F_t and anchor <- theta*_t;
  penalty = lam * sum F (theta - anchor)^2.
* ``separate`` (Kirkpatrick et al. 2017): one penalty per past task, lam * sum_t sum F_t (theta - theta*_t)^2, kept
  EXACTLY in O(1) memory per parameter. Per element, a sum of quadratics is one quadratic:

      sum_t F_t (theta - theta*_t)^2 = F (theta - theta_bar)^2 + c,
      F = sum_t F_t,   theta_bar = sum_t F_t theta*_t / F,   c = sum_t F_t theta*_t^2 - F theta_bar^2 >= 0.

  Adding a task (b, q) to the state (a, p) uses the cancellation-free form of the same identity:
  a (x - p)^2 + b (x - q)^2 = (a + b)(x - m)^2 + ab / (a + b) (p - q)^2 with m = (a p + b q) / (a + b); where
  a + b = 0 the element carries no penalty and m = q. The state is F, theta_bar per parameter and one scalar
  C = sum over elements of c, so the penalty value (lam * (sum F (theta - theta_bar)^2 + C)) and its gradient
  equal those of the per-task sum.

State: two tensors per protected parameter in ``state_dtype`` (fp32: 8 B/parameter, bf16: 4 B/parameter) plus a
few numbers; the penalty always computes in fp32. With ``fisher_bits=8`` the Fisher is stored block-wise quantized
(bitsandbytes' scheme, ``fastforget.quantize``: blocks of 256 elements, one fp32 absmax each, a code per element on
the unsigned dynamic map) and the anchor in bf16 unless ``state_dtype`` says otherwise: 1 + 4/256 + 2 ~ 3.02
B/parameter. The penalty paths dequantize one tensor at a time; ``ff.optim.ProtectedAdamW(state_bits=8)``
dequantizes inside its fused step.

Under FSDP2 (DTensor parameters, see ``fastforget.distributed``) the state tensors are DTensors sharded like the
parameters, the ops run on the local shards, and the penalty is the sum of the ranks' local penalties (one scalar
all-reduce whose backward passes the gradient through, so gradients equal the single-process ones).
"""

import logging
import math
import warnings

import torch

from fastforget import _validation as check
from fastforget import distributed as dist_util
from fastforget.defences import Defence, FusedOperands, TaskData, parameter_rows
from fastforget.fisher import ESTIMATORS, estimate_fisher, fisher_stats, trainable_parameters
from fastforget.ops.ewc_penalty import ewc_penalty, ewc_penalty_
from fastforget.quantize import dequantize_blockwise, dynamic_map, quantize_blockwise

logger = logging.getLogger("fastforget.ewc")

MODES = ("online", "separate")
BATCH_SCALE_WARNING = (
    "estimator='batch' squares each batch's mean gradient: its Fisher is about |b| (the batch size) times smaller "
    "than the per-sample estimators' ('empirical', 'true', 'mas'), so at the same lam the penalty is about |b| times "
    "weaker. Multiply a lam tuned for a per-sample estimator by the batch size, or compare "
    "ewc.last_fisher_stats (see docs/ewc.md, 'Choosing lam')"
)
_warned = set()
STATE_DTYPES = (torch.float32, torch.bfloat16)
FISHER_BITS = (32, 8)


class EWC(Defence):
    """Elastic Weight Consolidation over a model's trainable parameters.

    ``penalty()`` (autograd) and ``apply_()`` (one fused pass into ``.grad``) return 0 before anything has been
    consolidated, so the same training loop runs on the first task.

    As a ``ff.defences.Defence``: ``protect_gradients`` is ``apply_()``, ``fused_operands`` hands ProtectedAdamW the
    anchors and Fisher (its "quadratic" term), ``end_task`` is ``consolidate`` on the task's data.
    """

    name, step_timer, task_timer, fused_terms = "ewc", "ewc", "consolidate", ("quadratic",)

    def __init__(
        self, model, lam=0.4, *, mode="online", decay=1.0, state_dtype=None, fisher_bits=32, backend="auto"
    ):  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        check.check_choice("fisher_bits", fisher_bits, FISHER_BITS)
        if state_dtype is None:  # fp32; next to an 8-bit Fisher, a bf16 anchor (exact for bf16 parameters)
            state_dtype = torch.float32 if fisher_bits == 32 else torch.bfloat16
        if state_dtype not in STATE_DTYPES:
            raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16, not {state_dtype}")
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.names, self.params = trainable_parameters(model)
        self.group = dist_util.check_parameters(self.names, self.params)  # None unless sharded (FSDP2)
        if fisher_bits == 8 and self.group is not None:
            raise ValueError("fisher_bits=8 is not supported with sharded (FSDP2) parameters yet; use fisher_bits=32")
        self.fisher_bits = fisher_bits
        self.qmap = dynamic_map(signed=False).to(self._device()) if fisher_bits == 8 else None
        self.fisher_absmax = []  # fisher_bits=8: one fp32 absmax per block of 256 Fisher elements, per parameter
        self.lam = check.check_scalar("lam", lam, minimum=0.0)
        self.decay = check.check_scalar("decay", decay, minimum=0.0)
        if mode == "separate" and self.decay != 1.0:
            raise ValueError("decay applies to the online mode; the separate mode keeps every task at full weight")
        self.mode, self.state_dtype, self.backend = mode, state_dtype, backend
        self.tasks = 0
        self.anchors, self.fisher = [], []  # theta* (online) or theta_bar (separate); F or F_sum
        self.constant = 0.0  # C of the separate mode (a Python float: fp64)
        self.last_fisher_stats = None  # the last consolidation's {"estimator", "mean", "max", "elements"}

    def __repr__(self):
        count = sum(p.numel() for p in self.params)
        return (
            f"EWC(mode={self.mode!r}, lam={self.lam}, decay={self.decay}, tensors={len(self.params)}, "
            f"elements={count}, tasks={self.tasks}, state_dtype={self.state_dtype}, fisher_bits={self.fisher_bits})"
        )

    # ------------------------------------------------------------------------------------------------ training

    def penalty(self):
        """lam * (sum F (theta - anchor)^2 + C), differentiable (fp32 0-dim tensor); 0 before any consolidation."""
        if not self.tasks:
            return torch.zeros((), device=self._device())
        params = [dist_util.local(p) for p in self.params]
        try:
            if self.fisher_bits == 8:
                value = _QuantizedPenalty.apply(self, *params)
            else:
                value = ewc_penalty(
                    params, self._local(self.anchors), self._local(self.fisher), self.lam, backend=self.backend
                )
        except ValueError:
            self._check_shapes()  # name the parameter whose shape changed, if that is the problem
            raise
        return dist_util.sum_over_ranks(value, self.group) + self._offset()

    def apply_(self):
        """After task_loss.backward(): p.grad += the penalty's gradient in one fused pass; returns the penalty.

        A missing ``.grad`` is allocated as zeros (a DTensor sharded like its parameter under FSDP2)."""
        if not self.tasks:
            return torch.zeros((), device=self._device())
        params = self.params
        if self.group is not None:  # the fused op writes the local shard of each (DTensor) .grad
            params = []
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                shard = p.to_local().detach()
                shard.grad = p.grad.to_local()
                params.append(shard)
        try:
            if self.fisher_bits == 8:  # one dequantized Fisher at a time
                self._check_shapes()
                value = sum(
                    ewc_penalty_([p], [a], [self.fisher_tensor(i)], self.lam, backend=self.backend)
                    for i, (p, a) in enumerate(zip(params, self.anchors))
                )
            else:
                value = ewc_penalty_(
                    params, self._local(self.anchors), self._local(self.fisher), self.lam, backend=self.backend
                )
        except ValueError:
            self._check_shapes()
            raise
        if self.group is not None:
            torch.distributed.all_reduce(value, group=self.group)
        return value + self._offset()

    def _device(self):
        return dist_util.local(self.params[0]).device

    def fisher_tensor(self, i):
        """The Fisher of parameter `i` as a float tensor (fp32, dequantized, when ``fisher_bits=8``)."""
        if self.fisher_bits == 32:
            return self.fisher[i]
        return dequantize_blockwise(self.fisher[i], self.fisher_absmax[i], self.qmap)

    def fisher_tensors(self):
        """The Fisher of every protected parameter as float tensors (see ``fisher_tensor``); empty before the
        first task. With ``fisher_bits=8`` this materialises them all: the penalty paths take one at a time."""
        return [self.fisher_tensor(i) for i in range(len(self.fisher))]

    # -------------------------------------------------------------------------------------- as a defence

    def protect_gradients(self, scale=1.0):
        """``apply_()`` on gradients that are `scale` x the true ones (an fp16 GradScaler's, not unscaled yet):
        the EWC term goes in multiplied by `scale` too; returns the (true) penalty."""
        lam = self.lam
        self.lam = lam * scale
        try:
            return self.apply_().detach() / scale
        finally:
            self.lam = lam

    def fused_operands(self, params, grad_scale=None, found_inf=None):
        """ProtectedAdamW's operands for `params` (some of ``self.params``): their anchors and Fisher, ``lam`` and
        the separate mode's constant ``lam C`` as the penalty offset; nothing before the first task."""
        if not self.tasks:
            return FusedOperands()
        rows = parameter_rows(self, params)
        return FusedOperands(
            anchors=[self.anchors[i] for i in rows], fisher=[self.fisher[i] for i in rows],
            fisher_absmax=[self.fisher_absmax[i] for i in rows] if self.fisher_bits == 8 else [], lam=self.lam,
            penalty_offset=self._offset(),
        )  # fmt: skip

    def end_task(self, task: TaskData):
        """``consolidate`` over the task's loader, on the model as wrapped (under DDP the Fisher reduces over its
        process group)."""
        self.consolidate(
            task.loader, task.loss_fn, batch_loss=task.batch_loss, estimator=task.estimator,
            max_batches=task.max_batches, progress=task.progress, model=task.model,
        )  # fmt: skip

    @staticmethod
    def _local(tensors):
        return [dist_util.local(t) for t in tensors]

    def _offset(self):
        return self.lam * self.constant

    def _check_shapes(self):
        """The ops reject a shape mismatch by list index; this names the parameter (on the error path only)."""
        for name, p, a in zip(self.names, self.params, self.anchors):
            if p.shape != a.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)} but was consolidated with shape {tuple(a.shape)}"
                )

    # ------------------------------------------------------------------------------------------- consolidation

    def consolidate(
        self, loader, loss_fn=None, *, batch_loss=None, estimator="empirical", max_batches=None, model=None,
        progress=True, **kw,
    ):  # fmt: skip
        """Estimate the Fisher at the current parameters over `loader` and add the task (see the module doc).

        Batches are (inputs, targets) pairs with ``loss_fn(outputs, targets)``, or any structure (a Hugging Face
        dict of token ids, ...) with ``batch_loss(model, batch)``. `model` is needed only when this EWC was built
        from a (name, param) list. Other keywords go to ``ff.fisher.estimate_fisher`` (chunk_size, exact_classes,
        samples, generator).
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("this EWC was built from a parameter list: pass consolidate(..., model=the_module)")
        if estimator == "batch" and "batch" not in _warned:
            _warned.add("batch")
            warnings.warn(BATCH_SCALE_WARNING, UserWarning, stacklevel=2)
        fisher = estimate_fisher(
            model,
            loader,
            loss_fn,
            batch_loss=batch_loss,
            estimator=estimator,
            params=list(zip(self.names, self.params)),
            max_batches=max_batches,
            progress=progress,
            backend=self.backend,
            **kw,
        )
        self._check_estimated(fisher)
        self._add_task([p.detach() for p in self.params], fisher)
        self.last_fisher_stats = {"estimator": estimator, **fisher_stats(fisher)}
        logger.info(
            "EWC task %d: %s Fisher over %d elements, mean %.4g, max %.4g (lam %g)", self.tasks, estimator,
            self.last_fisher_stats["elements"], self.last_fisher_stats["mean"], self.last_fisher_stats["max"],
            self.lam,
        )  # fmt: skip
        return self.last_fisher_stats

    def _check_estimated(self, fisher):
        """A Fisher with a NaN/inf (a non-finite loss or gradient on the task's data) would make every later penalty
        and gradient NaN: refused before the state changes, on every rank (the count is summed over the shards)."""
        bad = torch.zeros((), dtype=torch.int64, device=self._device())
        first = None
        for name, f in zip(self.names, fisher):
            local = dist_util.local(f)
            count = (~local.isfinite()).sum() + (local < 0).sum()
            if first is None and bool(count):
                first = name
            bad += count
        if self.group is not None:
            torch.distributed.all_reduce(bad, group=self.group)
        if bool(bad):
            where = f", first in {first!r}" if first is not None else ""
            raise ValueError(
                f"the estimated Fisher has {int(bad)} non-finite or negative elements{where} (a NaN/inf loss or "
                "gradient on the task's data?); the EWC is unchanged"
            )

    def load_importance(self, anchors, fisher):
        """Add one task from tensors computed elsewhere: one anchor and one Fisher per protected parameter,
        in the order of ``self.names`` (the model's trainable parameters)."""
        anchors, fisher = check.tensor_list("anchors", anchors), check.tensor_list("fisher", fisher)
        for label, tensors in (("anchors", anchors), ("fisher", fisher)):
            if len(tensors) != len(self.params):
                raise ValueError(f"{label} has {len(tensors)} tensors but {len(self.params)} parameters are protected")
            for name, t, p in zip(self.names, tensors, self.params):
                if t.shape != p.shape:
                    raise ValueError(f"{label} for {name!r} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
                if not t.is_floating_point():
                    raise TypeError(f"{label} for {name!r} has dtype {t.dtype}; expected a floating point dtype")
        if any(bool((f < 0).any()) or not bool(f.isfinite().all()) for f in fisher):
            raise ValueError("fisher must be finite and >= 0")
        self._add_task(  # full tensors are sharded like DTensor parameters
            [dist_util.shard_like(a.detach().to(p.device), p) for a, p in zip(anchors, self.params)],
            [dist_util.shard_like(f.detach().to(p.device, torch.float32), p) for f, p in zip(fisher, self.params)],
        )

    @torch.no_grad()
    def _add_task(self, anchors, fisher):
        """Merge task (anchors theta*_t, fp32 Fisher F_t) into the state, computing in fp32 (C in fp64), one
        tensor at a time (an 8-bit Fisher is dequantized, merged and requantized per tensor).

        Sharded: on the local shards (C summed over the ranks), the results rewrapped like the parameters."""
        anchors, fisher = self._local(anchors), self._local(fisher)
        constant = torch.zeros((), dtype=torch.float64, device=self._device())
        merged_fisher, merged_anchors = [], []
        for i, (b, q) in enumerate(zip(fisher, anchors)):
            if self.tasks == 0:
                total, anchor = b, q
            elif self.mode == "online":  # F <- decay F + F_t, anchor <- theta*_t
                total, anchor = self.decay * dist_util.local(self.fisher_tensor(i)).float() + b, q
            else:
                a, p, q = (
                    dist_util.local(self.fisher_tensor(i)).float(),
                    dist_util.local(self.anchors[i]).float(),
                    q.float(),
                )
                total = a + b
                weighted = total > 0
                safe = torch.where(weighted, total, 1.0)
                anchor = torch.where(weighted, (a * p + b * q) / safe, q)
                constant += (torch.where(weighted, a * b / safe, 0.0) * (p - q).square()).sum(dtype=torch.float64)
            merged_fisher.append(self._stored_fisher(total))
            merged_anchors.append(anchor.to(self.state_dtype, copy=True))  # must not alias the live parameter
        if self.group is not None:
            torch.distributed.all_reduce(constant, group=self.group)
        self.fisher = [dist_util.like(f, p) for (f, _), p in zip(merged_fisher, self.params)]
        self.fisher_absmax = [absmax for _, absmax in merged_fisher] if self.fisher_bits == 8 else []
        self.anchors = [dist_util.like(a, p) for a, p in zip(merged_anchors, self.params)]
        self.constant += float(constant)
        self.tasks += 1

    def _stored_fisher(self, fisher):
        """(stored Fisher, absmax or None): a copy in ``state_dtype``, or the 8-bit codes and block absmax."""
        if self.fisher_bits == 8:
            return quantize_blockwise(fisher.float().contiguous(), self.qmap)
        return fisher.to(self.state_dtype, copy=True), None

    # --------------------------------------------------------------------------------------------------- state

    def state_dict(self):
        """Tensors and plain values only: loads with ``torch.load(weights_only=True)``. With ``fisher_bits=8``,
        "fisher" holds the uint8 codes and "fisher_absmax" their block absmax (the map is bitsandbytes' unsigned
        dynamic map, ``ff.quantize.dynamic_map(False)``).

        Before the first task the tensors are zeros: a template to load into, which is what
        ``torch.distributed.checkpoint.load`` needs (it fills existing tensors, resharding them)."""
        anchors, fisher, absmax = list(self.anchors), list(self.fisher), list(self.fisher_absmax)
        if not self.tasks:
            anchors = [
                dist_util.like(torch.zeros_like(self._local([p])[0], dtype=self.state_dtype), p) for p in self.params
            ]
            fisher = [torch.zeros_like(a, dtype=self._fisher_dtype()) for a in anchors]
            absmax = [torch.zeros(_blocks(p.numel()), device=self._device()) for p in self.params]
        state = {
            "mode": self.mode,
            "tasks": self.tasks,
            "constant": self.constant,
            "names": list(self.names),
            "anchors": anchors,
            "fisher": fisher,
        }
        if self.fisher_bits == 8:
            state["fisher_absmax"] = absmax
        return state

    def _fisher_dtype(self):
        return torch.uint8 if self.fisher_bits == 8 else self.state_dtype

    def load_state_dict(self, state):
        """Restore a state_dict onto this EWC's parameters (their device, this EWC's state_dtype and fisher_bits:
        an 8-bit Fisher loads into a 32-bit EWC dequantized, a float one into an 8-bit EWC quantized).

        Everything is checked first -- the mode, every parameter name and shape, finite non-negative Fisher (and
        block absmax), a constant that is >= 0 (and 0 in online mode) -- naming the first problem; nothing changes
        on error."""
        check.check_state("EWC", state, ("mode", "tasks", "constant", "names", "anchors", "fisher"))
        if state["mode"] != self.mode:
            raise ValueError(f"the state was saved in {state['mode']!r} mode but this EWC is {self.mode!r}")
        tasks, constant = state["tasks"], state["constant"]
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise ValueError(f"corrupt EWC state: tasks is {tasks!r}, not an integer >= 0")
        if not isinstance(constant, (int, float)) or not math.isfinite(constant) or constant < 0:
            raise ValueError(f"corrupt EWC state: constant is {constant!r}, not a finite number >= 0")
        if constant and (self.mode == "online" or not tasks):
            raise ValueError("corrupt EWC state: a nonzero constant belongs to the separate mode with tasks")
        names, anchors, fisher = list(state["names"]), list(state["anchors"]), list(state["fisher"])
        absmax = list(state.get("fisher_absmax", ()))
        if anchors or fisher or tasks:
            self._check_state_tensors(names, anchors, fisher, absmax)
        self.fisher_absmax = []
        if tasks:
            # full tensors or DTensors (as DCP loads them): on each parameter's device, sharded like it
            anchors = [dist_util.copy_like(a, p, self.state_dtype) for a, p in zip(anchors, self.params)]
            fisher = [self._loaded_fisher(i, f, absmax) for i, f in enumerate(fisher)]
            if self.fisher_bits == 8:
                fisher, self.fisher_absmax = [f for f, _ in fisher], [m for _, m in fisher]
        else:  # the zero tensors of a state before the first task are not kept
            anchors, fisher = [], []
        self.tasks, self.constant, self.anchors, self.fisher = tasks, float(constant), anchors, fisher

    def _loaded_fisher(self, i, fisher, absmax):
        """Saved Fisher `i` in this EWC's format: (codes, absmax) when 8-bit, else a tensor like the parameter."""
        p = self.params[i]
        if fisher.dtype == torch.uint8:
            if self.fisher_bits == 8:
                return fisher.to(p.device, copy=True).contiguous(), absmax[i].to(p.device, torch.float32, copy=True)
            qmap = dynamic_map(signed=False).to(fisher.device)
            fisher = dequantize_blockwise(fisher.contiguous(), absmax[i].to(fisher.device, torch.float32), qmap)
        if self.fisher_bits == 8:
            return quantize_blockwise(fisher.to(p.device, torch.float32).contiguous(), self.qmap)
        return dist_util.copy_like(fisher, p, self.state_dtype)

    def _check_state_tensors(self, names, anchors, fisher, absmax):
        if names != self.names:
            for i, name in enumerate(self.names):
                found = repr(names[i]) if i < len(names) else "nothing"
                if i >= len(names) or names[i] != name:
                    raise ValueError(f"parameter {i} is {name!r} here but {found} in the state")
            raise ValueError(f"the state has parameter {names[len(self.names)]!r}, which is not protected here")
        if not (len(anchors) == len(fisher) == len(names)):
            raise ValueError("corrupt EWC state: names, anchors and fisher differ in length")
        quantized = [isinstance(f, torch.Tensor) and f.dtype == torch.uint8 for f in fisher]
        if any(quantized) and len(absmax) != len(names):
            raise ValueError(
                f"the state's Fisher is 8-bit but it has {len(absmax)} fisher_absmax tensors for {len(names)} "
                "parameters"
            )
        for name, p, a, f, q, m in zip(self.names, self.params, anchors, fisher, quantized, absmax or fisher):
            for label, t in (("anchor", a), ("fisher", f)):
                if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or label == "fisher" and q):
                    raise TypeError(f"{label} of {name!r} in the state is not a floating point tensor (or uint8 codes)")
                if t.shape != p.shape:
                    raise ValueError(
                        f"{label} of {name!r} has shape {tuple(t.shape)} but the parameter {tuple(p.shape)}"
                    )
            if q:
                if self.group is not None:
                    raise ValueError(f"fisher of {name!r} in the state is 8-bit: not loadable into sharded parameters")
                if not isinstance(m, torch.Tensor) or m.dtype != torch.float32 or m.shape != (_blocks(p.numel()),):
                    found = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                    raise ValueError(
                        f"fisher_absmax of {name!r} in the state must be float32 of shape ({_blocks(p.numel())},) "
                        f"(one per block of {QUANT_BLOCK}), found {found}"
                    )
                f = m  # the codes are valid whatever they are: the block absmax carry the values
            f = dist_util.local(f)  # each rank checks its shard
            if not bool(f.isfinite().all()) or bool((f < 0).any()):
                raise ValueError(f"fisher of {name!r} in the state is not finite and >= 0")


QUANT_BLOCK = 256  # bitsandbytes' optimizer block size


def _blocks(numel):
    return -(-numel // QUANT_BLOCK)


class _QuantizedPenalty(torch.autograd.Function):
    """``EWC.penalty`` with an 8-bit Fisher: forward and backward dequantize one Fisher at a time (autograd keeps
    no dequantized copy), the forward through the fused ``ewc_penalty`` op, the backward
    2 lam F (theta - anchor) grad_out in fp32, rounded to each parameter's dtype."""

    @staticmethod
    def forward(ctx, ewc, *params):
        ctx.ewc = ewc
        ctx.save_for_backward(*params)
        total = torch.zeros((), device=ewc._device())
        for i, (p, a) in enumerate(zip(params, ewc.anchors)):
            total += ewc_penalty([p], [a], [ewc.fisher_tensor(i)], ewc.lam, backend=ewc.backend)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ewc, scale = ctx.ewc, 2 * ctx.ewc.lam * grad_out.float()
        grads = [
            (scale * ewc.fisher_tensor(i) * (p.float() - a.float())).to(p.dtype)
            for i, (p, a) in enumerate(zip(ctx.saved_tensors, ewc.anchors))
        ]
        return None, *grads
