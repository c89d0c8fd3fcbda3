"""Thresholding operators and the scaled straight-through estimator.

The operator family, for p >= 1 and a magnitude threshold T >= 0 (a number, or a tensor of
per-entry thresholds broadcast over w, e.g. one per N:M group):

    P_p(w; T) = sign(w) * (|w|^p - T^p)^(1/p)   if |w| > T,   else 0

p = 1 is soft thresholding, p = inf is hard thresholding (w * 1[|w| > T]) and p = 3 is
Feather's operator. T = 0 leaves every weight unchanged.

The straight-through estimator uses P_p in the forward pass and passes the gradient to
the dense weights, scaled per element:

    dL/dw = m * dL/dw~ + lambda * (1 - E) * w,   m = 1 where |w| > T, theta where |w| <= T

with E the mask of kept weights and lambda the optional decay of pruned weights (SR-STE's
"sparse-refined" term, Zhou et al., ICLR 2021; 0 by default).

An optional ``ties`` mask (bool, or the numbers 1 and 0) prunes more entries: where it is set the
forward value is 0 and the gradient is scaled by theta, as for |w| <= T (exact counts when magnitudes
tie; N:M groups held between updates: the entries pruned at the update, wherever their magnitudes have
moved since).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

Threshold = float | Tensor


def validate_p(p: float) -> float:
    """Return ``p`` as a float after checking that it is a valid exponent (p >= 1 or inf)."""
    p = float(p)
    if not p >= 1.0:  # also rejects NaN
        raise ValueError(f"p={p} is not a valid operator exponent; allowed: a number >= 1 or inf.")
    return p


def prunes_nothing(threshold: Threshold) -> bool:
    """Whether T leaves every weight unchanged: a number <= 0 (a tensor is assumed to prune)."""
    return not isinstance(threshold, Tensor) and threshold <= 0.0


@torch.no_grad()
def threshold_operator(w: Tensor, threshold: Threshold, p: float, magnitude: Tensor | None = None) -> Tensor:
    """Apply P_p(w; T) elementwise (a tensor T per entry; where T = 0 the weight is unchanged).
    The value only: the gradient the methods train with is the straight-through one of
    :func:`sparsify_ste`. ``magnitude``, if given, is |w| already computed; it serves as scratch
    space (its values are lost), saving a temporary as large as w.

    The difference |w|^p - T^p is computed so that it stays non-zero for every |w| > T in
    floating point (the count of zeros is then exactly the count of |w| <= T): for an integer p
    as (|w| - T) * sum_i |w|^i T^(p-1-i) (Feather's p = 3: (|w| - T)(|w|(|w| + T) + T^2), one
    root in all), for any other finite p > 1 as T^p * expm1(p * log1p((|w| - T) / T)).
    Float16 and bfloat16 weights are shrunk in float32 (in 16 bits the product underflows to 0
    just above T) and the result rounded back. For p = 3 on the CPU with one T, where numpy's cbrt is
    vectorized, the sign costs no pass: the cube root is odd, so
    P_3(w; T) = cbrt((w - clamp(w, -T, T)) * ((|w| + T)|w| + T^2)).
    """
    if prunes_nothing(threshold):
        return w
    if w.dtype in (torch.float16, torch.bfloat16) and p != 1.0 and not math.isinf(p):
        wide = threshold.float() if isinstance(threshold, Tensor) else threshold
        return threshold_operator(w.float(), wide, p).to(w.dtype)
    fresh = magnitude is None
    if fresh:
        magnitude = w.abs()  # every later step may work in place on it
    if math.isinf(p):
        return torch.addcmul(w, w, _pruned_numbers(w, threshold, None, magnitude, out=magnitude), value=-1.0)
    if p == 1.0:  # the result must be a fresh tensor
        return (magnitude.sub_(threshold) if fresh else magnitude - threshold).relu_().copysign_(w)
    if _odd_cbrt(magnitude, p) and not isinstance(threshold, Tensor):
        shrunk = _power_sum(magnitude, threshold, 3)  # fresh
        soft = torch.ops.aten.softshrink.out(w, threshold, out=magnitude)  # w - clamp(w, -T, T), one pass
        return root_(shrunk.mul_(soft), 3)
    if p.is_integer():
        shrunk = _power_sum(magnitude, threshold, int(p))  # fresh
        if isinstance(threshold, Tensor):
            excess = magnitude.sub_(threshold).relu_()
        else:  # (|w| - T)+ in one pass
            excess = torch.ops.aten.softshrink.out(magnitude, threshold, out=magnitude)
        shrunk = root_(shrunk.mul_(excess), int(p), scratch=excess)  # excess is spent
    else:
        shrunk = torch.expm1(magnitude.sub_(threshold).relu_().div_(threshold).log1p_().mul_(p))
        shrunk = shrunk.pow_(1.0 / p).mul_(threshold)
    out = shrunk.copysign_(w)
    return torch.where(threshold > 0, out, w) if isinstance(threshold, Tensor) else out


# numpy's cbrt runs vectorized (SVML) only on CPUs with AVX-512: there it is within an ulp and about four
# times faster than torch's pow (0.7 against 2.9 ms on 3.1 M floats); elsewhere it is a scalar loop, about
# 13 ns a value, three times slower than pow (13 against 3.9 ms on 1 M floats, AVX2, 2 threads).
NUMPY_CBRT_VECTORIZED = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _odd_cbrt(x: Tensor, p: float) -> bool:
    """Whether :func:`root_` takes x's p-th root through numpy's ``cbrt``, which is odd (cbrt(-x) =
    -cbrt(x)): p = 3 on a plain CPU float32/float64 tensor where numpy's cbrt is vectorized, outside
    torch.compile's tracing."""
    cpu_float = type(x) is Tensor and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    return p == 3 and NUMPY_CBRT_VECTORIZED and cpu_float and not torch.compiler.is_compiling()


def _newton_cbrt(x: Tensor, p: float) -> bool:
    """Whether :func:`root_` takes x's p-th root by :func:`cube_root_`'s Newton steps: p = 3 on a plain
    CPU float32 tensor where numpy's cbrt is not taken, outside torch.compile's tracing (inductor fuses
    the steps into one loop, but compiling them took three to fifteen times as long as the dense model:
    ResNet-20 137 against 41 s)."""
    cpu_float32 = type(x) is Tensor and x.device.type == "cpu" and x.dtype == torch.float32
    return p == 3 and cpu_float32 and not NUMPY_CBRT_VECTORIZED and not torch.compiler.is_compiling()


def root_(x: Tensor, p: int, scratch: Tensor | None = None) -> Tensor:
    """x^(1/p) in place, for x >= 0 (any x for :func:`_odd_cbrt`'s cube root): the cube root of a
    CPU float32/float64 tensor through numpy's ``cbrt`` where it is vectorized (within an ulp), of
    any other CPU float32 tensor by :func:`cube_root_` (within about two ulps; ``scratch``, a tensor
    like x whose values may be lost, saves it a temporary), any other root (and any root of a tensor
    subclass such as a DTensor, or while torch.compile traces) through ``pow_`` (within a few ulps: 1/3
    is rounded)."""
    if _odd_cbrt(x, p):
        array = x.numpy()
        np.cbrt(array, out=array)
        return x
    if _newton_cbrt(x, p):
        return cube_root_(x, scratch)
    return x.pow_(1.0 / p)


_INVERSE_CBRT_GUESS = float(0x54A2FA8C)  # 2^23 * 4 * 127 / 3, less a correction: see cube_root_
_NEWTON_STEPS = 3  # the guess is within 7 %; each step about squares the error: 8e-3, 1e-4, 3e-8
_GUESS_FLOOR = 1e-36  # the guess is taken of max(x, this): r stays below 3e12 and r^3 finite, also where x = 0


def cube_root_(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """x^(1/3) of a float32 tensor x >= 0, in place, as x r^2 with r = x^(-1/3) found without a
    transcendental function (``pow`` costs about 4 ns a value on a CPU without AVX-512, twenty
    multiplications' worth): a first guess from x's bits (the bits of a float are nearly a multiple
    of its base-2 logarithm, so an integer C - bits(x) / 3 reads as a float near x^(-1/3)), then
    Newton's steps for r^(-3) = x, r <- r + r (1 - x r^3) / 3, each a product and two fused
    multiply-adds over the tensor. x r^2 is 0 where x is, and within 2.1 float32 epsilons of the
    exact root for 1e-36 <= x <= 1e36 (``pow``: up to 7.4); non-zero below (the guess is taken of
    max(x, 1e-36)). ``scratch``: a tensor like x whose values may be lost, to hold r."""
    r = torch.clamp_min(x, _GUESS_FLOOR, out=scratch)  # a new tensor when scratch is None
    bits = r.view(torch.int32)
    work = torch.empty_like(x).copy_(bits)  # the bits as floats
    torch.add(torch.full((), _INVERSE_CBRT_GUESS, dtype=x.dtype), work, alpha=-1.0 / 3.0, out=work)  # C - bits(x) / 3
    bits.copy_(work)  # truncated to an integer: r now holds the first guess
    one = torch.ones((), dtype=x.dtype)
    for _ in range(_NEWTON_STEPS):
        torch.pow(r, 3, out=work)
        torch.addcmul(one, x, work, value=-1.0, out=work)  # 1 - x r^3
        r.addcmul_(r, work, value=1.0 / 3.0)
    return x.mul_(r).mul_(r)


def _power_sum(a: Tensor, t: Threshold, p: int) -> Tensor:
    """sum_{i=0}^{p-1} a^i t^(p-1-i) by Horner's rule: ((a + t) a + t^2) a + ... + t^(p-1)."""
    total = a + t
    for power in range(2, p):
        total.mul_(a).add_(t**power)
    return total


def kept_mask(
    w: Tensor, threshold: Threshold, ties: Tensor | None = None, magnitude: Tensor | None = None
) -> Tensor:
    """E: True where |w| > T and w is not a pruned tie (``magnitude``: |w| if already computed)."""
    kept = (w.abs() if magnitude is None else magnitude) > threshold
    return kept & ~ties if ties is not None else kept


def _pruned_numbers(w: Tensor, threshold: Threshold, ties: Tensor | None, magnitude: Tensor | None,
                    out: Tensor | None = None) -> Tensor:
    """1 - E as the numbers 1 (pruned) and 0 in w's dtype, written into ``out`` (may be ``magnitude``,
    |w|, whose values are then spent) or a new tensor: products with it stay in one dtype, several
    times faster on the CPU than with a bool mask. While torch.compile traces, as min(sign(T - |w|) + 1, 1),
    without a comparison, and ``ties`` as numbers too (:func:`tie_numbers`): inductor's CPU code writes a
    bool tensor (which it saves for the backward) about ten times slower than a float one."""
    magnitude = w.abs() if magnitude is None else magnitude
    if torch.compiler.is_compiling():  # in w's dtype: T may be wider (N:M thresholds of mixed-dtype layers)
        pruned = (threshold - magnitude).sign().add(1.0).clamp(max=1.0).to(w.dtype)
        return pruned if ties is None else torch.maximum(pruned, ties)
    pruned = torch.le(magnitude, threshold, out=torch.empty_like(w) if out is None else out)
    return pruned if ties is None else torch.maximum(pruned, ties, out=pruned)  # ties may also lie at or below T


def tie_numbers(magnitude: Tensor, value: Tensor, count: Tensor) -> Tensor:
    """1 at the first ``count`` entries (flat order) whose magnitude equals ``value``, 0 elsewhere, in the
    magnitude's dtype, by arithmetic alone (see :func:`_pruned_numbers`): (1 - |sign(|w| - v)|) *
    clamp(count - index, 0, 1)."""
    index = torch.arange(magnitude.numel(), device=magnitude.device).view(magnitude.shape)
    return (magnitude - value).sign().abs().neg().add(1.0) * (count - index).clamp(0, 1)


def _zero_at(out: Tensor, ties: Tensor) -> Tensor:
    """``out`` with 0 where ``ties`` is True or 1 (a bool mask, or numbers from :func:`tie_numbers`);
    elsewhere ``out`` unchanged, infinities included."""
    return out * ~ties if ties.dtype == torch.bool else out * (1.0 - ties)


class _ScaledStraightThrough(torch.autograd.Function):
    """Forward: P_p(w; T), zero at ``ties``, optionally rescaled per output channel.
    Backward: m * grad + decay * (1 - E) * w, with 1 - E kept from the forward pass as numbers."""

    @staticmethod
    def forward(ctx, w: Tensor, threshold: Threshold, p: float, theta: float, rescale: Tensor | None,
                ties: Tensor | None, decay: float, magnitude: Tensor | None) -> Tensor:
        prunes = not prunes_nothing(threshold) or ties is not None
        needed = prunes and (theta != 1.0 or decay)  # the backward needs E
        ctx.theta, ctx.decay = theta, decay
        if math.isinf(p) and prunes:  # the hard threshold is w - w (1 - E): 1 - E serves both passes
            pruned = _pruned_numbers(w, threshold, ties, magnitude, out=magnitude)
            out = torch.addcmul(w, w, pruned, value=-1.0)
        else:
            pruned = _pruned_numbers(w, threshold, ties, magnitude) if needed else None
            out = threshold_operator(w, threshold, p, magnitude)
            if ties is not None:
                out = _zero_at(out, ties)  # a product: faster than masked_fill on CPU
        ctx.save_for_backward(w if needed and decay else None, pruned if needed else None)
        return out if rescale is None else out * rescale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, pruned = ctx.saved_tensors
        none = (None,) * 7
        if pruned is None:
            return grad, *none
        # products with 1 - E as numbers rather than torch.where or masked_fill: several times faster on CPU;
        # grad - grad (1 - E) is grad where kept and 0 where pruned, exactly
        scaled = grad
        if ctx.theta != 1.0:
            scaled = torch.addcmul(grad, grad, pruned, value=-1.0)
            if ctx.theta:
                scaled.addcmul_(grad, pruned, value=ctx.theta)
        if ctx.decay:
            scaled = torch.addcmul(grad, w, pruned, value=ctx.decay) if scaled is grad else scaled.addcmul_(w, pruned, value=ctx.decay)
        return scaled, *none


def sparsify_ste(
    w: Tensor,
    threshold: Threshold,
    p: float,
    theta: float,
    rescale: Tensor | None = None,
    ties: Tensor | None = None,
    decay: float = 0.0,
    magnitude: Tensor | None = None,
) -> Tensor:
    """P_p(w; T), zero at ``ties`` (times ``rescale``, broadcast over w), with the theta-scaled
    straight-through gradient plus ``decay`` times the pruned weights (``magnitude``: |w| already
    computed, used as scratch space, see :func:`threshold_operator`)."""
    return _ScaledStraightThrough.apply(w, threshold, p, theta, rescale, ties, decay, magnitude)
