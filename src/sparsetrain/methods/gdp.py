"""GDP: gates with differentiable polarization (Guo et al., "GDP: Stabilized Neural Network
Pruning via Gates with Differentiable Polarization", ICCV 2021).

No public code exists; this is our reading of the paper, choice by choice.

Gates. Every group of coupled channels (see :mod:`sparsetrain.structured.surgery`) gets one
trainable parameter x_c per channel and the gate

    g(x) = x^2 / (x^2 + eps),        g in [0, 1), g = 0 exactly when x = 0.

Every regular (not depthwise) convolution, and the final Linear layer, reads its input channels
gated: its weight is parametrized as W[:, c] * g_c (the same as scaling its input by g, since the
layer is linear in its input; transformers' Conv1D, stored (in, out), as W[c, :] * g_c). All
readers of one group share its gates: every convolution reading a ResNet residual stream uses
the one gate vector of that stream. Depthwise convolutions are not gated; their channels belong
to the group of the layer feeding them and are gated where the next regular convolution reads
them. The input image is never gated.

The gate parameters x are a parameter *of the model* (held by the first gated layer's
parametrization), so an optimizer built from ``model.parameters()`` trains them and
``model.state_dict()`` holds them.

Transformers. Only what can be removed without breaking the model is gated: the hidden units of
each MLP (BERT's and ViT's intermediate layer, read by the output layer; Llama's SwiGLU units,
written by ``gate_proj`` and ``up_proj`` together and read by ``down_proj``; GPT-2's ``c_fc`` ->
``c_proj``). Attention is not gated at all: no channel of a query, key, value or output
projection, so no head is ever cut in part (:mod:`~sparsetrain.structured.surgery` leaves out
every group whose channels meet attention), and nothing of the residual stream, which passes
layer norms and embeddings. ``example_inputs`` may be a tensor or a dict of named tensors
(``{"input_ids": ..., "attention_mask": ...}``, passed as ``model(**example_inputs)``) and the
model may return an output object (its ``.logits`` are traced). Before any training, ``create()``
removes one channel of every gated group from a copy and checks, by running both on
``example_inputs`` (eval mode), that the copy computes what the model with those gates at zero
computes; a model failing it (something between a group's layers mixes its channels) is
refused naming the group.

FLOPs. Each Conv/Linear layer l costs f_l (its dense FLOPs on ``example_inputs``, counted as
``torch.utils.flop_counter`` does: 2 * output elements * input channels per group * kernel
size) scaled by its active input and output channels:

    F(g) = sum_l f_l * (a_in_l / C_in_l) * (a_out_l / C_out_l)

with a = the sum of the gates of the channels read or written (1 for ungated channels such
as the image and the logits). Depthwise convolutions have a_in = a_out and cost f_l * a_out /
C_out. F is bilinear in the gates of consecutive layers. What else the counter counts (attention's
matrix products; nothing in a CNN) is a constant f_0 added to F. With the gates replaced by
1[x != 0] ("hard" counts) F equals, exactly, the FLOPs of the compact model ``finalize()``
returns.

Objective. The objective adds ``penalty() = lambda * F(g) / F_dense``; ``before_optimizer_step()``
adds its gradient to the gates' (so the penalty works in trainers that never show us the loss).
Its gradient on a gate is the FLOPs its channel costs divided by the channel's fan n_c, the
number of Conv/Linear layers reading or writing the channel's group (the value of the penalty is
unchanged):

    d penalty / d g_c = lambda / F_dense * (dF / dg_c) / n_c

so every layer presses on its channels alike. Without the division a residual stream channel,
read and written by every block of its stage, is pushed n_c / 2 times harder than a block's
inner channel: the streams are emptied first and no inner convolution is ever thinned (thin
convolutions that run no faster). Call ``step()`` right after
``optimizer.step()``. It works towards a reference of the hard FLOPs ratio that falls like
the cubic sparsity schedule over the pruning window [0, t_end], t_end = prune_end * T:

    r_ref(t) = target + (1 - target) * (1 - min(t / t_end, 1))^3

and does, in order:

1. eps annealing, geometric over the whole training: eps(t) = eps_start * (eps_end / eps_start)^(t / T).
   Early, large eps gives every gate a gradient; late, small eps polarizes: g(x) -> 1 for
   every x != 0, so the gated network becomes the compact one.
2. The proximal step that makes exact zeros (a hard threshold, the proximal map of an L0 term):
   a gate whose g(x) fell below ``gate_min`` (|x| < sqrt(eps * gate_min / (1 - gate_min))) or
   whose sign flipped in the last optimizer step (it crossed 0) is set to exactly 0. Zeros are
   taken smallest |x| first and only while the hard FLOPs ratio stays at least
   r_ref(t) - tolerance * target, and every group keeps max(1, ceil(min_keep * its size)) channels; a crossing gate that may
   not be zeroed yet is put back where it was. A zero gate is dead for good: its parameter is
   reset to 0 at every step (g'(0) = 0, so only optimizer momentum could move it).
3. Hold: the first time the hard FLOPs ratio is at most the target, zeros stop for good, the
   penalty switches off and lambda freezes; the rest of training fine-tunes the kept channels.
4. lambda adapts, multiplicatively, on the ratio r_small the hard FLOPs would have if every
   gate now under the threshold were zeroed (it responds at once, unlike the hard ratio):
   lambda <- lambda * exp(lr_lambda * (r_small - r_ref(t)) / ((1 - target) * t_end)).
   Too few small gates: lambda grows; more than the reference lets go: it shrinks. The rate is
   per pruning window, so the defaults behave alike for 100 steps or 100,000.
5. Safeguard: if at t_end the target is still not met, the live gates with the smallest |x|
   are zeroed under the same rule until it is. ``forced`` counts these (0 when lambda did its job).

So the compact model's FLOPs land in [target * (1 - tolerance), target]: within 2 % of the
target for tolerance <= 0.02 (default 0.01), and it equals the hard ratio ``flops_ratio(hard=True)``.

Optimizing the gates. Weight decay on the gates would add a second, unweighted shrinkage:
give 1-D parameters none (as the training recipe does). Under DDP the gates' gradients are
averaged with the others; the penalty's gradient, a function of the gates alone, is the same on
every rank.

Finalizing. ``finalize()`` folds every gate into the weights of the layers reading it
(W[:, c] *= g_c, removing the parametrizations), removes the zero-gated channels from their
whole group, in place, with :func:`~sparsetrain.structured.surgery.remove_channels_`, and returns
the same model object, now compact and plain; in eval mode it computes what the gated model
computed. A Hugging Face model's config is updated to describe it (each layer may keep its own
number of MLP units, which ``intermediate_size`` or ``n_inner`` cannot state): if every MLP kept
the same width, that key is set and plain ``from_pretrained`` loads what ``save_pretrained``
wrote; otherwise ``config.sparsetrain_shapes`` records the narrowed layers' sizes and
``sparsetrain.load_compact(ModelClass, folder)`` rebuilds the model from them
(:func:`~sparsetrain.structured.surgery.record_shapes_`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from ..calls import ExampleInputs, call_model, logits_of, map_inputs
from ..declare import Axis, Declared, option
from ..measure import input_width, output_width
from ..messages import shown
from ..modes import eval_mode
from ..prunable import out_in, stores_transposed
from ..schedules import validate_total_steps
from ..structured.surgery import (
    ChannelGroup,
    Coupling,
    is_depthwise,
    is_layer,
    remove_channels,
    remove_channels_,
    trace_couplings,
)
from .protocol import Method, check_finite
from .registry import Context, MethodSpec, register_method


@dataclass(frozen=True)
class GDPOptions(Declared):
    """GDP's options (the maths: the module docstring)."""

    flops_target: float = option(0.5, "FLOPs of the compact model, as a fraction of the dense model's", low=0.0,
                                 high=1.0, low_open=True, high_open=True, axis=Axis("flops-targets", "f", (0.5,)))
    eps_start: float = option(0.1, "eps of the gates g = x^2 / (x^2 + eps) at the start", low=0.0, low_open=True)
    eps_end: float = option(1e-4, "eps at the end of the pruning window", low=0.0, low_open=True)
    init: float = option(1.0, "initial x of every gate", low=0.0, low_open=True)
    lambda_init: float = option(1.0, "initial weight of the FLOPs penalty", low=0.0, low_open=True)
    lr_lambda: float = option(20.0, "log-rate of the FLOPs weight per pruning window", low=0.0, low_open=True)
    gate_min: float = option(0.01, "gate value under which a gate is zeroed", low=0.0, high=1.0, low_open=True,
                             high_open=True)
    prune_end: float = option(0.5, "end of the pruning window, as a fraction of training", unit="fraction", low=0.0,
                              high=1.0, low_open=True)
    tolerance: float = option(0.01, "how far under the target, as a fraction of it, the compact model's FLOPs may land",
                              low=0.0, high=1.0, high_open=True)
    min_keep: float = option(0.25, "fraction of each group's channels that stays (at least one)", low=0.0, high=1.0,
                             high_open=True)

    def check(self) -> None:
        if self.eps_end > self.eps_start:
            raise ValueError(f"eps_start={self.eps_start!r}, eps_end={self.eps_end!r} are not allowed; allowed: "
                             "0 < eps_end <= eps_start.")


class GateBank:
    """The gate parameters x and the current eps, shared by every gated layer."""

    def __init__(self, gates: nn.Parameter, eps: float) -> None:
        self.gates, self.eps = gates, eps

    def values(self) -> Tensor:
        """g(x) = x^2 / (x^2 + eps) of every gated channel."""
        x2 = self.gates * self.gates
        return x2 / (x2 + self.eps)

    def values_and_one(self) -> Tensor:
        """g(x) with a trailing 1, the value of every ungated feature."""
        return torch.cat([self.values(), self.gates.new_ones(1)])


class InputGate(nn.Module):
    """The parametrization of a reader's weight: W[:, c] * g_c, g looked up by input feature
    (W[c, :] * g_c for a weight stored (in, out), ``transposed``).

    The bank's parameter is registered only on the first reader (``owner``), so the model holds
    it once; the others reach it through the bank, which is not a module.
    """

    def __init__(self, bank: GateBank, index: Tensor, owner: bool, transposed: bool = False) -> None:
        super().__init__()
        if owner:
            self.gates = bank.gates
        self.__dict__["bank"] = bank
        self.transposed = transposed
        self.register_buffer("index", index, persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        gate = self.bank.values_and_one()[self.index].to(weight.dtype)
        weight = out_in(weight, self.transposed)
        return out_in(weight * gate.view((1, -1) + (1,) * (weight.dim() - 2)), self.transposed)


class GDP(Method):
    """Channel gates trained with a FLOPs penalty whose weight adapts to land on ``flops_target``.

    ``total_steps`` (T) is the number of ``step()`` calls in training; ``example_inputs`` a batch
    (a tensor or a dict of named tensors) used to trace the model and count FLOPs; the knobs are
    those of :class:`GDPOptions`.
    """

    name = "gdp"
    removes_channels = True

    def __init__(
        self,
        model: nn.Module,
        flops_target: float,
        total_steps: int,
        example_inputs: ExampleInputs,
        **knobs: Any,
    ) -> None:
        super().__init__()
        options = self.options = GDPOptions(flops_target, **knobs)
        self.target = float(options.flops_target)
        self.model = model
        self.total_steps = validate_total_steps(total_steps)
        self.eps_start, self.eps_end = float(options.eps_start), float(options.eps_end)
        self.lr_lambda, self.gate_min, self.tolerance = float(options.lr_lambda), float(options.gate_min), float(options.tolerance)
        self.prune_steps = max(1, round(options.prune_end * total_steps))
        self.lambda_init = float(options.lambda_init)
        self.example_inputs = map_inputs(_checked_inputs(example_inputs), lambda x: x.detach().clone())

        _, couplings = trace_couplings(copy.deepcopy(model), example_inputs)
        self.couplings: list[Coupling] = [c for c in couplings if not c.is_output and c.unsupported is None]
        if not self.couplings:
            raise ValueError(f"model {type(model).__name__} has no channel group GDP can gate; allowed: a model with "
                             "regular convolutions whose channels are read by another convolution or linear layer, "
                             "or a transformer's MLP.")
        offsets = np.cumsum([0] + [c.channels for c in self.couplings])
        self.size = int(offsets[-1])  # gated channels; index self.size is the constant 1
        self._group_of = np.repeat(np.arange(len(self.couplings)), [c.channels for c in self.couplings])
        self._min_live = np.array([max(1, math.ceil(options.min_keep * c.channels)) for c in self.couplings])

        modules = dict(model.named_modules())
        in_index: dict[str, np.ndarray] = {}
        out_index: dict[str, np.ndarray] = {}
        for name, module in modules.items():
            if is_layer(module):
                in_index[name] = np.full(input_width(module), self.size)
                out_index[name] = np.full(output_width(module), self.size)
        for coupling, offset in zip(self.couplings, offsets):
            for name, pairs in coupling.inputs.items():
                index = in_index[name]
                for feature, channel in pairs:
                    if index[feature] != self.size:
                        raise ValueError(f"input {feature} of layer {name!r} belongs to two channel groups; "
                                         "allowed: models whose layer inputs are unions of channel groups.")
                    index[feature] = offset + channel
            for name, pairs in coupling.outputs.items():
                for channel_out, channel in pairs:
                    out_index[name][channel_out] = offset + channel

        dense, self._fixed_flops = _dense_flops(model, example_inputs)
        names = [name for name in in_index if name in dense]
        self.dense_flops = float(sum(dense.values())) + self._fixed_flops
        cols = self.size + 1
        m_in = np.zeros((len(names), cols))
        m_out = np.zeros((len(names), cols))
        coef = np.zeros(len(names))
        for row, name in enumerate(names):
            np.add.at(m_out[row], out_index[name], 1.0)
            if is_depthwise(modules[name]):
                m_in[row, self.size] = 1.0
                coef[row] = dense[name] / len(out_index[name])
            else:
                np.add.at(m_in[row], in_index[name], 1.0)
                coef[row] = dense[name] / (len(in_index[name]) * len(out_index[name]))
        self._m_in, self._m_out, self._coef = m_in, m_out, coef  # float64, for the hard counts
        fan = ((m_in[:, : self.size] > 0) | (m_out[:, : self.size] > 0)).sum(axis=0)

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.gates = nn.Parameter(torch.full((self.size,), float(options.init), device=device))
        self.bank = GateBank(self.gates, self.eps_start)
        self._soft = [torch.as_tensor(a, dtype=torch.float32, device=device) for a in (m_in, m_out, coef)]
        self._inverse_fan = torch.as_tensor(1.0 / np.maximum(fan, 1), dtype=torch.float32, device=device)
        self._readers = [
            name for name, index in in_index.items()
            if name in dense and (index != self.size).any() and not is_depthwise(modules[name])
        ]
        for name in self._readers:
            if parametrize.is_parametrized(modules[name], "weight"):
                raise ValueError(f"layer {name!r} is already parametrized; allowed: a model not yet attached to a method.")
        _check_removable(model, self.couplings, self.example_inputs)
        for position, name in enumerate(self._readers):
            module = modules[name]
            index = torch.as_tensor(in_index[name], device=device)
            gate = InputGate(self.bank, index, position == 0, stores_transposed(module))
            parametrize.register_parametrization(module, "weight", gate)

        self._step = 0
        self.lam = self.lambda_init
        self.forced = 0
        self.holding = False
        self._last = self.gates.detach().clone()  # x after the last step(); its zeros are dead

    # -- the gated forward pass ----------------------------------------------------------

    @property
    def eps(self) -> float:
        """The current eps of g(x) = x^2 / (x^2 + eps)."""
        return self.bank.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.bank.eps = value

    def gate_values(self) -> Tensor:
        """g(x) of every gated channel, groups concatenated in the order of :attr:`groups`."""
        return self.bank.values()

    # -- reading the state ---------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called (t)."""
        return self._step

    @property
    def groups(self) -> list[ChannelGroup]:
        """The gated channel groups, in gate order."""
        return [c.group() for c in self.couplings]

    def flops(self) -> Tensor:
        """Expected FLOPs F(g) under the current gates: differentiable with respect to them."""
        return self._expected_flops(self.gate_values())

    def _expected_flops(self, gates: Tensor) -> Tensor:
        g = torch.cat([gates, gates.new_ones(1)])
        m_in, m_out, coef = self._soft
        return (coef * (m_in @ g) * (m_out @ g)).sum() + self._fixed_flops

    def flops_ratio(self, hard: bool = False) -> float:
        """F(g) / F_dense; with ``hard``, the gates counted as 1[x != 0] (the compact model's ratio)."""
        if not hard:
            with torch.no_grad():
                return float(self.flops()) / self.dense_flops
        return self._hard_ratio(self._alive())

    def kept_channels(self) -> dict[str, int]:
        """Nonzero gates per group, by root layer name."""
        alive = self._alive()
        return {c.root: int(alive[self._group_of == k].sum()) for k, c in enumerate(self.couplings)}

    def metrics(self) -> dict[str, float]:
        return {"flops_ratio": self.flops_ratio(hard=True)}

    def penalty(self) -> Tensor:
        """lambda * F(g) / F_dense, its gradient on each gate divided by the gate's fan; zero (still
        differentiable) once holding. ``before_optimizer_step()`` adds its gradient; a loop that
        adds the penalty to its loss instead must not call that too."""
        g = self.gate_values()
        g = g.detach() + (g - g.detach()) * self._inverse_fan  # value g, gradient scaled by 1 / n_c
        return (0.0 if self.holding else self.lam) * self._expected_flops(g) / self.dense_flops

    def reference(self, step: int | None = None) -> float:
        """r_ref(t), the hard FLOPs ratio lambda steers towards at step t (default: now)."""
        t = self._step if step is None else step
        return self.target + (1.0 - self.target) * (1.0 - min(t / self.prune_steps, 1.0)) ** 3

    def eps_at(self, step: int) -> float:
        """eps(t) = eps_start * (eps_end / eps_start)^(t / T), t clipped to [0, T]."""
        return self.eps_start * (self.eps_end / self.eps_start) ** (min(max(step, 0), self.total_steps) / self.total_steps)

    def _alive(self) -> np.ndarray:
        return (self.gates.detach() != 0).cpu().numpy()

    def _hard_ratio(self, alive: np.ndarray) -> float:
        counts = np.append(alive.astype(np.float64), 1.0)
        flops = float((self._coef * (self._m_in @ counts) * (self._m_out @ counts)).sum()) + self._fixed_flops
        return flops / self.dense_flops

    # -- changing the state --------------------------------------------------------------

    def _check_optimizer(self, optimizer: object) -> None:
        """Also: the optimizer must hold the gates (build it after ``create()``)."""
        super()._check_optimizer(optimizer)
        if not any(p is self.gates for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer does not hold GDP's gates; allowed: an optimizer built from "
                             "model.parameters() after sparsetrain.create().")

    def before_optimizer_step(self) -> None:
        """Add the penalty's gradient to the gates' gradient (nothing once holding)."""
        self._check_attached()
        if self.holding:
            return
        (grad,) = torch.autograd.grad(self.penalty(), self.gates)
        if self.gates.grad is None:
            self.gates.grad = grad
        else:
            self.gates.grad.add_(grad)

    def step(self) -> bool:
        """Advance t: anneal eps, make exact zeros by the proximal step, adapt lambda. A NaN or
        infinite gate is a FloatingPointError naming its group."""
        self._check_attached()
        self._step += 1
        with torch.no_grad():
            magnitudes = self.gates.abs().split([c.channels for c in self.couplings])
            check_finite(magnitudes, [c.root for c in self.couplings], "gate group", "gate", self._step)
            x = self.gates
            x[self._last == 0] = 0
            self.eps = self.eps_at(self._step)
            if not self.holding:
                # Reaching zero: |x| under the threshold, or a sign change (the step crossed zero).
                crossed = (self._last != 0) & (torch.sign(x) != torch.sign(self._last))
                magnitude = torch.where(crossed, torch.zeros_like(x), x.abs())
                small = (self._last != 0) & (magnitude < self.zero_threshold())
                goal = self.reference() if self._step < self.prune_steps else self.target
                self._zero_smallest(small.nonzero().flatten().cpu().numpy(), goal, magnitude.cpu().numpy())
                kept = crossed & (x != 0)
                x[kept] = self._last[kept]
            if not self.holding and self._step >= self.prune_steps:
                alive = np.flatnonzero(self._alive())
                self.forced += self._zero_smallest(alive, self.target, x.abs().cpu().numpy())
            self._last = x.detach().clone()
            if not self.holding:
                large = (x.abs() >= self.zero_threshold()).cpu().numpy()
                error = (self._hard_ratio(large) - self.reference()) / (1.0 - self.target)
                self.lam *= math.exp(self.lr_lambda * error / self.prune_steps)
                self.lam = min(max(self.lam, 1e-6 * self.lambda_init), 1e6 * self.lambda_init)
        return False

    def zero_threshold(self) -> float:
        """|x| below which the proximal step zeroes a gate: where g(x) = gate_min under the current eps."""
        return math.sqrt(self.eps * self.gate_min / (1.0 - self.gate_min))

    def _zero_smallest(self, indices: np.ndarray, goal: float, magnitude: np.ndarray) -> int:
        """Zero gates among ``indices``, smallest ``magnitude`` first, while the hard FLOPs ratio stays at
        least goal - tolerance * target and each group keeps its min_keep share (one gate at least); stop once the ratio
        is at most ``goal``, and hold for good once it is at most the target. Returns the count."""
        x = self.gates
        alive = self._alive()
        counts = np.append(alive.astype(np.float64), 1.0)
        a_in, a_out = self._m_in @ counts, self._m_out @ counts
        live = np.bincount(self._group_of[alive], minlength=len(self.couplings))
        floor = (goal - self.tolerance * self.target) * self.dense_flops
        zeroed = 0
        if float((self._coef * a_in * a_out).sum()) + self._fixed_flops <= goal * self.dense_flops:
            return zeroed  # on or ahead of the reference already
        for i in indices[np.argsort(magnitude[indices], kind="stable")]:
            if live[self._group_of[i]] <= self._min_live[self._group_of[i]]:
                continue
            new_in, new_out = a_in - self._m_in[:, i], a_out - self._m_out[:, i]
            flops = float((self._coef * new_in * new_out).sum()) + self._fixed_flops
            if flops < floor:
                continue
            x[int(i)] = 0
            a_in, a_out = new_in, new_out
            live[self._group_of[i]] -= 1
            zeroed += 1
            if flops <= goal * self.dense_flops:
                self.holding = flops <= self.target * self.dense_flops
                break
        return zeroed

    # -- finishing -----------------------------------------------------------------------

    def finalize(self) -> nn.Module:
        """Fold the gates into the readers' weights, remove the parametrizations and the
        zero-gated channels (in place), and return the compact plain model."""
        self._check_attached()
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name in self._readers:
                parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
            alive = self._alive()
            offset, drop = 0, {}
            for coupling in self.couplings:
                dead = {c for c in range(coupling.channels) if not alive[offset + c]}
                offset += coupling.channels
                if dead:
                    drop[coupling.root] = [i for i, c in coupling.outputs[coupling.root] if c in dead]
        self._finalized = True
        if self.optimizer is not None:  # the gates are gone from the model: the optimizer lets go too
            for group in self.optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not self.gates]
            self.optimizer.state.pop(self.gates, None)
        remove_channels_(self.model, drop, self.example_inputs, self.optimizer)
        return self.model

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The gate parameters after the last step, lambda, eps, step, hold flag, forced count and
        the settings they belong to: with the model's state dict (which holds the gates themselves),
        everything needed to resume. Save it right after ``step()``."""
        return {
            "method": self.name,
            "last": self._last.clone(),
            "lambda": self.lam,
            "eps": self.eps,
            "step": self._step,
            "forced": self.forced,
            "holding": self.holding,
            "groups": [c.root for c in self.couplings],
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        """Every option and the training length."""
        return {**dataclasses.asdict(self.options), "total_steps": self.total_steps}

    def _check_model(self, state: Mapping[str, Any]) -> None:
        roots = [c.root for c in self.couplings]
        if list(state["groups"]) != roots or tuple(state["last"].shape) != (self.size,):
            raise ValueError(f"this state gates groups {list(state['groups'])[:3]}...; allowed: a state of a GDP on "
                             f"the same model, gating {roots[:3]}... ({self.size} channels).")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of a GDP on the same model with the same
        settings (anything else is refused naming what differs)."""
        self._check_attached()
        self._check_state(state)
        self.lam = float(state["lambda"])
        self.eps = float(state["eps"])
        self._step = int(state["step"])
        self.forced = int(state["forced"])
        self.holding = bool(state["holding"])
        self._last = state["last"].to(self._last.device).clone()


def _checked_inputs(example_inputs: object) -> ExampleInputs:
    """``example_inputs`` if it is a tensor or a non-empty mapping of names to tensors, else ``ValueError``."""
    if isinstance(example_inputs, Tensor) or (
        isinstance(example_inputs, Mapping) and example_inputs
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in example_inputs.items())
    ):
        return example_inputs
    raise ValueError(f"example_inputs={shown(example_inputs)} is not allowed; allowed: a tensor batch the model accepts, "
                     "or a dict of named tensors such as {'input_ids': ..., 'attention_mask': ...}.")


def _dense_flops(model: nn.Module, example_inputs: ExampleInputs) -> tuple[dict[str, float], float]:
    """FLOPs of each Conv/Linear/Conv1D layer on ``example_inputs`` (eval mode, no grad), as
    ``torch.utils.flop_counter`` counts them: 2 * output elements * inputs per output; and f_0,
    what the counter counts besides (attention's matrix products, by their math path as
    :func:`~sparsetrain.measure.count_flops` counts them)."""
    flops: dict[str, float] = {}

    def count(name: str, module: nn.Module, args: Sequence[Tensor], output: Tensor) -> None:
        if isinstance(module, _ConvNd):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_output = input_width(module)
        flops[name] = flops.get(name, 0.0) + 2.0 * output.numel() * per_output

    hooks = [m.register_forward_hook(partial(count, n)) for n, m in model.named_modules() if is_layer(m)]
    try:
        with torch.no_grad(), eval_mode(model), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            call_model(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return flops, float(counter.get_total_flops()) - sum(flops.values())


def _check_removable(model: nn.Module, couplings: Sequence[Coupling], example_inputs: ExampleInputs) -> None:
    """Refuse the model unless removing the last channel of every group (of two or more) computes
    what the model computes with those channels' inputs zeroed in their readers (their gates at
    zero), checked on ``example_inputs`` in eval mode; the refusal (a ValueError) names the first
    group that fails alone (the first group if none does)."""
    testable = [c for c in couplings if c.channels > 1]
    if not testable or _removal_holds(model, testable, example_inputs):
        return
    culprit = next((c for c in testable if not _removal_holds(model, [c], example_inputs)), testable[0])
    raise ValueError(
        f"GDP cannot gate the channels of layer {culprit.root!r} (read by {', '.join(culprit.inputs)}): removing one "
        "changes what the model computes with its gate at zero, so something between these layers mixes channels; "
        "allowed: models whose gated channels reach the next layers through channel-wise operations."
    )


def _removal_holds(model: nn.Module, couplings: Sequence[Coupling], example_inputs: ExampleInputs) -> bool:
    """Whether the model cut by one channel per coupling computes what ``model`` computes with
    those channels zeroed in its readers' weights (restored afterwards); a cut model that fails
    to run (any exception) does not."""
    drop = {c.root: [i for i, channel in c.outputs[c.root] if channel == c.channels - 1] for c in couplings}
    modules = dict(model.named_modules())
    saved = []
    with torch.no_grad(), eval_mode(model):
        compact = remove_channels(model, drop, example_inputs)  # a copy, in eval mode like the model
        try:
            cut = logits_of(call_model(compact, example_inputs))
        except Exception:  # whatever stops the cut model from running
            return False
        try:
            for c in couplings:
                for name, pairs in c.inputs.items():
                    module = modules[name]
                    weight = out_in(module.weight, stores_transposed(module))
                    features = [feature for feature, channel in pairs if channel == c.channels - 1]
                    saved.append((weight, features, weight[:, features].clone()))
                    weight[:, features] = 0
            masked = logits_of(call_model(model, example_inputs))
        finally:
            for weight, features, values in reversed(saved):
                weight[:, features] = values
    scale = float(masked.abs().nan_to_num().max()) if masked.numel() else 0.0
    return cut.shape == masked.shape and torch.allclose(cut, masked, rtol=1e-3, atol=1e-3 * max(scale, 1e-12),
                                                        equal_nan=True)


def _build(model: nn.Module, options: GDPOptions, context: Context) -> GDP:
    knobs = options.values()
    return GDP(model, knobs.pop("flops_target"), context.total_steps, context.need_example_inputs("gdp"), **knobs)


register_method(MethodSpec(
    "gdp", GDPOptions, _build,
    "channel gates with differentiable polarization and a FLOPs penalty; zero gates removed (ICCV 2021)",
))
