"""Layer-wise relevance propagation (LRP) with the alpha-beta rule, for feature relevance scores.

Relevance R starts at the output as the one-hot of the true label (R = 1 at the true class,
0 elsewhere, whatever the logits) and flows back layer by layer, with the conventions of the
public FRS code (purdue-nrl/Gradual-Channel-Pruning-using-FRS):

- Linear and Conv (alpha = 2, beta = 1; Bach et al. 2015, "On pixel-wise explanations ..."),
  with contributions z_ij = x_i w_ij of input i to output j:

      R_i = sum_j (alpha z_ij+ / z_j+  -  beta z_ij- / z_j-) R_j,
      z_j+ = sum_i z_ij+,   z_j- = sum_i z_ij-

  where t+ = max(t, 0) and t- = min(t, 0). Biases take no relevance. A ratio whose
  denominator is 0 has a numerator of 0 too and counts as 0 (the public code adds 1e-9 to
  the denominators instead, which leaves spurious relevance where a denominator is 0).
- Batch norm and ReLU pass relevance through unchanged (R_in = R_out).
- Parameter-free linear operations (average and adaptive pooling, flatten, mean, residual
  adds, concatenation) redistribute relevance in proportion to the contributions, as a
  linear layer under the z-rule would: a sum c = a + b gives R_a = a R_c / c and
  R_b = b R_c / c. Max pooling gives all of it to the maximum. Other nonlinearities
  (sigmoid, GELU, ...) have no rule here: they would be treated as gradient times input.

Implementation: relevance is carried by autograd in "gradient times input" form. Every tensor
t in the graph carries g_t with R_t = t * g_t (elementwise); the output layer's backward takes
R = one-hot as given. Autograd's own backward of
a parameter-free op then is exactly the proportional rule above (for an add, g flows unchanged
to both summands, so each gets summand * g = its proportional share), and ReLU's backward is
the pass-through. Forward hooks swap in custom backwards for Linear/Conv (the alpha-beta rule)
and batch norm (pass-through); the forward values are untouched. Entries where a layer's
input is exactly 0 carry no relevance (R = 0 * g): a batch-norm input of exactly 0 loses the
relevance of its output.

Activations are read from the forward pass itself: a torch-function mode sees every ReLU
the model computes, as a module (``nn.ReLU``, in place or not, called once or several times)
or as a function (``F.relu``, ``torch.relu``, ``Tensor.relu_``), and the autograd graph holds
its input and output. Each is named after the module running it: an ``nn.ReLU`` module by
its own name, a ReLU function called in module M's forward as ``"M.relu()"`` (``"relu()"`` in
the model's own forward); the k-th call (k >= 2) of the same gets ``"#k"`` appended
(``"relu#2"``). The model may return logits (N, classes) or an object holding them (a
Hugging Face output's ``.logits``, or the first tensor of a tuple or mapping).

The network is run in eval mode (batch norm uses its running statistics). Other modules
with their own parameters are rejected with a ``ValueError`` naming the first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode

from ..calls import logits_of
from ..modes import eval_mode

ALPHA = 2.0
BETA = 1.0

_AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Activation:
    """A post-ReLU activation: the Linear/Conv layers writing its channels (sorted) and
    whether a residual add lies between them and the ReLU (a residual block's output)."""

    sources: tuple[str, ...]
    after_add: bool


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0."""
    return (numerator / denominator).masked_fill_(denominator == 0, 0.0)


def _affine(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The module's linear map with ``weight`` and no bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)  # type: ignore[operator]


def alpha_beta(module: nn.Module, x: Tensor, relevance: Tensor,
               alpha: float = ALPHA, beta: float = BETA, eps: float = 0.0) -> Tensor:
    """R_in of a Linear/Conv ``module`` with input ``x`` for output relevance ``relevance``.

    ``eps`` > 0 reproduces the public FRS code's stabiliser: eps is added to z+ and z- and,
    in convolutions, every weight counts on both sides (W+ = max(W, eps), W- = min(W, -eps)).
    """
    weight = module.weight.detach()
    floor = eps if eps and not isinstance(module, nn.Linear) else 0.0
    w_pos, w_neg = weight.clamp(min=floor), weight.clamp(max=-floor)
    # Split the input by sign: z+ collects x+ W+ and x- W-, z- collects x+ W- and x- W+.
    # Inputs after a ReLU have no negative part, which is then skipped.
    parts = [(x.clamp(min=0), w_pos, w_neg)]
    if bool(x.amin() < 0):
        parts.append((x.clamp(max=0), w_neg, w_pos))
    with torch.enable_grad():
        inputs = [part.detach().requires_grad_(True) for part, _, _ in parts]
        z_pos = sum(_affine(module, part, w_p) for part, (_, w_p, _) in zip(inputs, parts)) + eps
        z_neg = sum(_affine(module, part, w_n) for part, (_, _, w_n) in zip(inputs, parts)) + eps
        # The vector-Jacobian products give, for each input part, sum_j w_ij (alpha R_j / z_j+)
        # over its positive contributions minus sum_j w_ij (beta R_j / z_j-) over its negative ones.
        grads = torch.autograd.grad(
            (z_pos, z_neg), inputs, (alpha * _ratio(relevance, z_pos), -beta * _ratio(relevance, z_neg))
        )
    return sum(part.detach() * grad for part, grad in zip(inputs, grads))


class _AlphaBetaBackward(torch.autograd.Function):
    """Identity on the layer's output; backward maps g_out to g_in by the alpha-beta rule."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, module: nn.Module, eps: float) -> Tensor:
        ctx.save_for_backward(x, out)
        ctx.module, ctx.eps = module, eps
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, out = ctx.saved_tensors
        start = getattr(ctx, "start", None)  # the output layer's relevance is set directly
        r_in = alpha_beta(ctx.module, x, out * grad if start is None else start, eps=ctx.eps)
        # R_in = x * g_in; where x == 0 the rule gives R_in = 0 and g_in is set to 0.
        return _ratio(r_in, x), None, None, None


class _PassThroughBackward(torch.autograd.Function):
    """Identity on the layer's output; backward passes relevance through (R_in = R_out)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(x, out)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, out = ctx.saved_tensors
        return _ratio(out * grad, x), None


def _check_supported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _AFFINE_TYPES + _NORM_TYPES):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            where = f"layer {name!r}" if name else "the model's own module"
            raise ValueError(
                f"{where} ({type(module).__name__}) has parameters but no relevance rule; "
                "allowed: Linear, Conv1d/2d/3d and BatchNorm1d/2d/3d with parameters, any parameter-free module."
            )


@contextmanager
def _lrp_hooks(model: nn.Module, eps: float) -> Iterator[dict[Any, tuple[str, str]]]:
    """Swap in the relevance backwards; yields a map grad_fn -> (module name, "affine"/"norm")."""
    _check_supported(model)
    nodes: dict[Any, tuple[str, str]] = {}

    def hook(name: str, kind: str):
        def fn(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = inputs[0]
            if kind == "affine":
                out = _AlphaBetaBackward.apply(x, out.detach(), module, eps)
            else:
                out = _PassThroughBackward.apply(x, out.detach())
            nodes[out.grad_fn] = (name, kind)
            return out
        return fn

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _AFFINE_TYPES):
            handles.append(module.register_forward_hook(hook(name, "affine")))
        elif isinstance(module, _NORM_TYPES):
            handles.append(module.register_forward_hook(hook(name, "norm")))
    try:
        yield nodes
    finally:
        for handle in handles:
            handle.remove()


def _sources(grad_fn: Any, nodes: dict[Any, tuple[str, str]]) -> tuple[set[str], bool]:
    """Linear/Conv layers whose output reaches ``grad_fn`` through batch norms and adds only,
    and whether an add was passed on the way."""
    found: set[str] = set()
    stack, seen, added = [grad_fn], set(), False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name, kind = nodes.get(node, (None, None))
        if kind == "affine":
            found.add(name)
        elif kind == "norm" or type(node).__name__ == "AddBackward0":
            added = added or kind != "norm"
            stack.extend(parent for parent, _ in node.next_functions)
    return found, added


_RELU_NODE = "ReluBackward0"  # autograd's node for relu and relu_ alike


class _ReluCalls(TorchFunctionMode):
    """While active, records each ReLU the model computes, in order, as ``calls[name] =
    (output value, gradient edge of the output)``, named as the module docstring says."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {module: name for name, module in model.named_modules()}
        self.running: list[nn.Module] = []  # the modules whose forward is running, innermost last
        self.calls: dict[str, tuple[Tensor, GradientEdge]] = {}
        self._counts: dict[str, int] = {}
        self._seen: set[Any] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        node = out.grad_fn if isinstance(out, Tensor) else None
        if type(node).__name__ == _RELU_NODE and node not in self._seen:  # a new ReLU, not a view of one
            self._seen.add(node)
            self.calls[self._name()] = (out.detach(), get_gradient_edge(out))
        return out

    def _name(self) -> str:
        module = self.running[-1]
        owner = self.names[module]
        base = owner if isinstance(module, nn.ReLU) else f"{owner}.relu()" if owner else "relu()"
        count = self._counts[base] = self._counts.get(base, 0) + 1
        return base if count == 1 else f"{base}#{count}"

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """Keep ``running`` up to date during the model's forward pass."""
        def enter(module: nn.Module, inputs: Any) -> None:
            self.running.append(module)

        def leave(module: nn.Module, inputs: Any, output: Any) -> None:
            self.running.pop()

        handles = [h for m in self.names for h in (m.register_forward_pre_hook(enter),
                                                    m.register_forward_hook(leave, always_call=True))]
        try:
            with self:
                yield
        finally:
            for handle in handles:
                handle.remove()


class _Trace:
    """One relevance forward pass: the logits and, for each ReLU fed by Linear/Conv layers,
    its output value, the gradient edge of its output and its activation."""

    def __init__(self, model: nn.Module, x: Tensor, eps: float = 0.0) -> None:
        relus = _ReluCalls(model)
        with torch.enable_grad(), eval_mode(model), _lrp_hooks(model, eps) as nodes, relus.tracking():
            self.x = x.detach().clone().requires_grad_(True)
            self.logits = logits_of(model(self.x))
        self.nodes = nodes
        self.outputs: dict[str, Tensor] = {}
        self.edges: dict[str, GradientEdge] = {}
        self.activations: dict[str, Activation] = {}
        for name, (value, edge) in relus.calls.items():
            sources, added = _sources(edge.node.next_functions[0][0], nodes)
            if sources:
                self.outputs[name], self.edges[name] = value, edge
                self.activations[name] = Activation(tuple(sorted(sources)), added)
        if self.logits.dim() != 2:
            raise ValueError(
                f"the model's output has shape {tuple(self.logits.shape)}; allowed: logits of shape (N, classes)."
            )

    def start(self, y: Tensor) -> Tensor:
        """Start relevance at the logits from the one-hot of ``y``; returns the g to backpropagate.

        When a Linear/Conv layer computes the logits, its backward takes R = one-hot as given;
        otherwise g = one-hot / z (a logit of exactly 0 then starts no relevance).
        """
        if y.shape != self.logits.shape[:1]:
            raise ValueError(
                f"labels have shape {tuple(y.shape)}; allowed: shape ({self.logits.shape[0]},), one per sample."
            )
        onehot = F.one_hot(y.long(), self.logits.shape[1]).to(self.logits.dtype)
        node = self.logits.grad_fn
        if self.nodes.get(node, (None, None))[1] == "affine":
            node.start = onehot
            return onehot
        return _ratio(onehot, self.logits.detach())

    def relevance(self, y: Tensor) -> dict[str, Tensor]:
        """Per-sample per-channel relevance (N, C), spatially averaged, at each traced ReLU."""
        start = self.start(y)
        names = list(self.outputs)
        if not names:
            return {}
        grads = torch.autograd.grad(self.logits, [self.edges[n] for n in names], start, allow_unused=True)
        result = {}
        for name, grad in zip(names, grads):
            out = self.outputs[name]
            r = out * grad if grad is not None else torch.zeros_like(out)
            result[name] = r.flatten(2).mean(2) if r.dim() > 2 else r
        return result


def post_relu_activations(model: nn.Module, example_inputs: Tensor) -> dict[str, Activation]:
    """Each ReLU (module or function, named as the module docstring says) whose input comes
    from Linear/Conv layers through batch norms and residual adds only, in forward order.

    A channel c of such a ReLU's output is output channel c of each of its source layers.
    ReLUs fed otherwise (e.g. by a concatenation, as in DenseNet's BN-ReLU-conv) are left out.
    """
    return _Trace(model, example_inputs).activations


def channel_relevance(model: nn.Module, x: Tensor, y: Tensor, eps: float = 0.0) -> dict[str, Tensor]:
    """LRP alpha-beta (2, 1) relevance of the true class ``y`` at each post-ReLU activation.

    Returns, for each ReLU listed by :func:`post_relu_activations`, the relevance of its
    output averaged over spatial positions: a tensor (N, C) per ReLU name. The model runs in
    eval mode and is left in the mode it had; its parameters and gradients are untouched.
    ``eps``: see :func:`alpha_beta` (0: the exact rule).
    """
    return relevance_and_logits(model, x, y, eps)[0]


def relevance_and_logits(model: nn.Module, x: Tensor, y: Tensor, eps: float = 0.0) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`channel_relevance` and the (detached, eval-mode) logits of the same forward pass."""
    trace = _Trace(model, x, eps)
    return trace.relevance(y), trace.logits.detach()


def input_relevance(model: nn.Module, x: Tensor, y: Tensor, eps: float = 0.0) -> Tensor:
    """LRP alpha-beta (2, 1) relevance of the true class ``y`` at the input, shape of ``x``."""
    trace = _Trace(model, x, eps)
    (grad,) = torch.autograd.grad(trace.logits, trace.x, trace.start(y))
    return trace.x.detach() * grad
