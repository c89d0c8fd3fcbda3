"""Thresholding operators and the scaled straight-through estimator.

The operator family, for p >= 1 and a magnitude threshold T >= 0:

    P_p(w; T) = sign(w) * (|w|^p - T^p)^(1/p)   if |w| > T,   else 0

p = 1 is soft thresholding, p = inf is hard thresholding (w * 1[|w| > T]) and p = 3 is
Feather's operator. T = 0 leaves every weight unchanged.

The straight-through estimator uses P_p in the forward pass and passes the gradient to
the dense weights, scaled per element:

    dL/dw = m * dL/dw~,   m = 1 where |w| > T, theta where |w| <= T

An optional boolean ``ties`` mask prunes more entries: where it is True the forward value is 0
and the gradient is scaled by theta, as for |w| <= T (exact counts when magnitudes tie).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def validate_p(p: float) -> float:
    """Return ``p`` as a float after checking that it is a valid exponent (p >= 1 or inf)."""
    p = float(p)
    if not p >= 1.0:  # also rejects NaN
        raise ValueError(f"p={p} is not a valid operator exponent; allowed: a number >= 1 or inf.")
    return p


def threshold_operator(w: Tensor, threshold: float, p: float) -> Tensor:
    """Apply P_p(w; T) elementwise.

    The difference |w|^p - T^p is computed so that it stays non-zero for every |w| > T in
    floating point (the count of zeros is then exactly the count of |w| <= T): for an integer p
    as (|w| - T) * sum_i |w|^i T^(p-1-i) (Feather's p = 3: (|w| - T)(|w|(|w| + T) + T^2), one
    power function in all), for any other finite p > 1 as T^p * expm1(p * log1p((|w| - T) / T)).
    Float16 and bfloat16 weights are shrunk in float32 (in 16 bits the product underflows to 0
    just above T) and the result rounded back.
    """
    if threshold <= 0.0:
        return w
    if math.isinf(p):
        return w * (w.abs() > threshold)
    if w.dtype in (torch.float16, torch.bfloat16) and p != 1.0:
        return threshold_operator(w.float(), threshold, p).to(w.dtype)
    magnitude = w.abs()
    excess = torch.relu(magnitude - threshold)
    if p == 1.0:
        return torch.sign(w) * excess
    if p.is_integer():
        shrunk = (excess * _power_sum(magnitude, threshold, int(p))).pow(1.0 / p)
    else:
        shrunk = threshold * torch.expm1(p * torch.log1p(excess / threshold)).pow(1.0 / p)
    return torch.sign(w) * shrunk


def _power_sum(a: Tensor, t: float, p: int) -> Tensor:
    """sum_{i=0}^{p-1} a^i t^(p-1-i) by Horner's rule: ((a + t) a + t^2) a + ... + t^(p-1)."""
    total = a + t
    for power in range(2, p):
        total = total * a + t**power
    return total


def gradient_scale(w: Tensor, threshold: float, theta: float, ties: Tensor | None = None) -> Tensor:
    """The straight-through gradient mask m: 1 where |w| > T (and not a pruned tie), theta elsewhere."""
    if threshold <= 0.0 and ties is None:
        return torch.ones_like(w)
    kept = w.abs() > threshold
    if ties is not None:
        kept &= ~ties
    return kept.to(w.dtype) if theta == 0.0 else torch.where(kept, 1.0, theta).to(w.dtype)


class _ScaledStraightThrough(torch.autograd.Function):
    """Forward: P_p(w; T), zero at ``ties``, optionally rescaled per output channel. Backward: m * grad."""

    @staticmethod
    def forward(ctx, w: Tensor, threshold: float, p: float, theta: float, rescale: Tensor | None,
                ties: Tensor | None) -> Tensor:
        ctx.threshold, ctx.theta = threshold, theta
        ctx.save_for_backward(w, ties)
        out = threshold_operator(w, threshold, p)
        if ties is not None:
            out = out.masked_fill(ties, 0.0)
        return out if rescale is None else out * rescale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, ties = ctx.saved_tensors
        if ctx.theta == 1.0 or (ctx.threshold <= 0.0 and ties is None):
            return grad, None, None, None, None, None
        return grad * gradient_scale(w, ctx.threshold, ctx.theta, ties), None, None, None, None, None


def sparsify_ste(
    w: Tensor, threshold: float, p: float, theta: float, rescale: Tensor | None = None, ties: Tensor | None = None
) -> Tensor:
    """P_p(w; T), zero at ``ties`` (times ``rescale``, broadcast over w), with the theta-scaled
    straight-through gradient."""
    return _ScaledStraightThrough.apply(w, threshold, p, theta, rescale, ties)
