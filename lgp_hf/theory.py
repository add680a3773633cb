r"""Variance and cost analysis of Linear Gradient Prediction with control variates.

Setting
-------
A mini-batch ``B`` of ``n`` examples, drawn iid from the data distribution, is
split uniformly at random into a *control* micro-batch ``C`` of
``n_c = f n`` examples (full forward + backward, true per-example trunk
gradients ``g_i``) and a *prediction* micro-batch ``P = B \ C`` (only cheap
head-side signals).  A linear predictor gives ``ĝ_i = A s_i`` for every
example in ``B``.  The trunk update is the control-variate estimator::

    est = mean_{i in C} (g_i - beta ĝ_i) + beta mean_{i in B} ĝ_i .

All variances below are *traces* of covariance matrices of per-example
quantities::

    sigma2  = E ||g - E g||^2                      (tr Var g)
    kappa   = sqrt(tr Var ĝ / sigma2)             (relative size of ĝ)
    rho     = tr Cov(g, ĝ) / sqrt(tr Var g tr Var ĝ)   (alignment)

Unbiasedness and variance
-------------------------
Write ``h = g - beta ĝ``.  Then ``est = mean_B g + (mean_C h - mean_B h)``.
If ``A`` and ``beta`` are fixed before ``C`` is drawn, then conditionally on
``B``, ``mean_C h`` is the mean of a simple random sample (without
replacement) of size ``n_c`` from the ``n`` values ``h_i``, so
``E[mean_C h | B] = mean_B h``: the estimator is unbiased for ``mean_B g``
and hence for ``E g``.  The same conditional-mean-zero property makes the two
terms uncorrelated, so their variances add:

* ``tr Var(mean_B g) = sigma2 / n`` (iid examples);
* the sampling-without-replacement formula gives
  ``E tr Var(mean_C h | B) = (1/n_c - 1/n) E[S_B^2(h)]`` where ``S_B^2`` is the
  (n-1)-normalised within-batch variance, whose expectation is
  ``sigma_X^2 = tr Var h = sigma2 (1 - 2 beta kappa rho + beta^2 kappa^2)``.

Hence, exactly (for iid ``B`` and uniform ``C`` within ``B``)::

    Var(est) = sigma2 / n + sigma_X^2 (1/n_c - 1/n).

``sigma_X^2`` is a quadratic in ``beta`` minimised at ``beta* = rho / kappa``
where ``sigma_X^2 = sigma2 (1 - rho^2)``; with ``1/n_c - 1/n = (1/f - 1)/n``::

    Var*(est) = sigma2 / n [ rho^2 + (1 - rho^2) / f ].

Cost and break-even
-------------------
Counting one full forward+backward example as cost 1 and a prediction example
as cost ``c``, one step costs ``n (f + (1 - f) c)``.  Plain backprop on the
same batch has variance ``sigma2 / n`` at cost ``n``.  Variance times compute
(the variance reached per unit compute) relative to backprop is::

    R(f, c, rho) = [rho^2 + (1 - rho^2)/f] (f + (1 - f) c).

Setting ``R = 1`` with ``q = f + (1 - f) c``: ``rho^2 (1 - 1/f) = 1/q - 1/f``,
i.e. ``rho^2 (f - 1) q = f - q = -(1 - f) c``, so for ``f < 1``::

    rho^2_break-even = c / (f + (1 - f) c).

``dR/d(rho^2) = q (1 - 1/f) < 0`` for ``f < 1``, so the method wins
(``R < 1``) exactly when ``rho^2`` is above the break-even value.  At ``f = 1``
the estimator *is* backprop and ``R = 1`` for every ``rho``.

For any ``beta`` (not only ``beta*``), ``sigma_X^2 = sigma2 (1 - E)`` with
``E = 1 - tr Var(g - beta ĝ) / tr Var(g)``, the variance explained *as
applied*, so ``Var(est) = sigma2 / n [E + (1 - E) / f]`` and every formula here
holds with ``rho^2`` replaced by ``E`` (``E <= rho^2``, with equality at
``beta*``; ``E < 0`` when the prediction adds variance).  ``E`` is what the
trainer measures (``estimator.variance_explained``) and compares with
``break_even_rho2``.

Optimal control fraction
------------------------
Expanding, ``R(f) = rho^2 c + (1-rho^2)(1-c) + rho^2 (1-c) f + (1-rho^2) c / f``,
convex in ``f > 0``, with stationary point::

    f* = sqrt( (1 - rho^2) c / (rho^2 (1 - c)) ),

and minimum ``R(f*) = (|rho| sqrt(c) + sqrt((1-rho^2)(1-c)))^2 <= 1`` (equal to
1 iff ``rho^2 = c``).  ``f* < 1`` iff ``rho^2 > c``; by convexity the best
``f`` on ``[f_min, 1]`` is ``f*`` clipped to that interval, and whenever the
method cannot beat backprop the clipped value is ``1`` (plain backprop).

Cost ratio
----------
A prediction example needs a no-grad trunk forward (one forward) while a full
example needs a forward and a backward, so with ``r = t_backward/t_forward``
``c ≈ 1 / (1 + r)`` (the head's own forward/backward is neglected); with
``r ≈ 2`` this gives ``c ≈ 1/3``.  ``cost_ratio_from_times`` uses measured
per-example times instead.

What this analysis leaves out
-----------------------------
It counts gradient *noise* only: the optimisation-relevant quantity
``E||est||^2 = ||E g||^2 + Var`` also contains the signal term
``||mean gradient||^2``, which is the same for both methods, so relative
variance overstates the practical difference when the mean gradient dominates
the noise.  It ignores optimizer effects: Adam's per-coordinate normalisation,
momentum averaging over steps, weight decay, learning-rate schedules; equal
trace variance does not imply equal training curves.  It treats the examples
of ``B`` as iid draws, i.e. it omits the finite-population correction
``(N - n)/(N - 1)`` of drawing ``B`` without replacement from a dataset of
``N`` examples (the within-batch draw of ``C`` without replacement from ``B``
*is* accounted for exactly; it is the ``- 1/n`` in ``1/n_c - 1/n``); it
also treats ``n_c = f n`` as a real number, ignoring rounding.  It assumes
``A`` and ``beta`` are fixed before ``C`` is drawn (fitting them on the same
control batch introduces a bias, typically of order ``1/n_c``).  Finally ``rho`` is a
*per-example* correlation of centred gradients: a batch-level cosine between
the predicted and true mean gradient on a control batch is larger than
``rho`` when the mean gradient dominates the per-example noise (both vectors
then point along the common mean), so it must not be plugged in as ``rho``.
Compute is counted in units of examples; memory, kernel efficiency at small
micro-batches and the cost of fitting ``A`` are not modelled.
"""

from __future__ import annotations

import math
from numbers import Real

__all__ = [
    "step_cost_ratio",
    "cost_ratio_from_backward_forward",
    "cost_ratio_from_times",
    "optimal_beta",
    "estimator_variance",
    "backprop_variance",
    "relative_efficiency",
    "break_even_rho2",
    "break_even_alignment",
    "optimal_control_fraction",
    "best_relative_efficiency",
]


def _real(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """Return ``value`` as float, raising ValueError naming ``name`` if it is not
    a finite real in the interval described by ``lo``/``hi``."""
    lo_br = "(" if lo_open else "["
    hi_br = ")" if hi_open else "]"
    lo_s = "-inf" if lo is None else repr(lo)
    hi_s = "inf" if hi is None else repr(hi)
    allowed = f"{lo_br}{lo_s}, {hi_s}{hi_br}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number in {allowed}, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite real number in {allowed}, got {value!r}")
    bad = (
        (lo is not None and (x < lo or (lo_open and x == lo)))
        or (hi is not None and (x > hi or (hi_open and x == hi)))
    )
    if bad:
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    return x


def _fraction(value, name="control_fraction"):
    return _real(name, value, 0.0, 1.0, lo_open=True)


def _cost(value):
    return _real("cost_ratio", value, 0.0, 1.0)


def _rho(value):
    return _real("rho", value, -1.0, 1.0)


def step_cost_ratio(control_fraction, cost_ratio):
    """Compute per step relative to plain backprop: ``f + (1 - f) c``.

    A fraction ``f`` of the batch costs one full forward+backward each, the
    rest cost ``c`` each (in units of a full example); dividing by the ``n``
    full examples of a backprop step gives ``f + (1 - f) c``.
    """
    f = _fraction(control_fraction)
    c = _cost(cost_ratio)
    return f + (1.0 - f) * c


def cost_ratio_from_backward_forward(backward_forward_ratio):
    """Cost ratio ``c ≈ 1 / (1 + r)`` from ``r = t_backward / t_forward``.

    A prediction example costs one (no-grad) trunk forward ``t_f``; a full
    example costs ``t_f + t_b = t_f (1 + r)``.  The head's own forward and
    backward are neglected.
    """
    r = _real("backward_forward_ratio", backward_forward_ratio, 0.0, None)
    return 1.0 / (1.0 + r)


def cost_ratio_from_times(prediction_time, full_time):
    """Cost ratio ``c = t_prediction / t_full`` from measured per-example times.

    ``prediction_time``: time of a prediction example (no-grad trunk forward
    plus the head work); ``full_time``: time of a full forward+backward
    example, both for the same number of examples.  Measurement noise can
    make the ratio exceed 1; it is clipped to 1 (the method then cannot win).
    """
    tp = _real("prediction_time", prediction_time, 0.0, None)
    tf = _real("full_time", full_time, 0.0, None, lo_open=True)
    return min(tp / tf, 1.0)


def optimal_beta(rho, kappa=1.0):
    """Variance-minimising control-variate coefficient ``beta* = rho / kappa``.

    ``sigma_X^2(beta) = sigma2 (1 - 2 beta kappa rho + beta^2 kappa^2)`` has
    derivative ``2 sigma2 kappa (beta kappa - rho)``, zero at ``rho / kappa``.
    Equivalently ``beta* = tr Cov(g, ĝ) / tr Var ĝ`` (a regression slope).
    """
    r = _rho(rho)
    k = _real("kappa", kappa, 0.0, None, lo_open=True)
    return r / k


def estimator_variance(control_fraction, batch_size, sigma2, rho, beta=None, kappa=1.0):
    """Trace variance of the control-variate estimator.

    ``Var = sigma2/n + sigma_X^2 (1/n_c - 1/n)``, ``n_c = f n``, with
    ``sigma_X^2 = sigma2 (1 - 2 beta kappa rho + beta^2 kappa^2)`` the
    per-example variance of ``g - beta ĝ`` (see the module docstring for the
    derivation).  ``beta=None`` uses ``beta* = rho / kappa``, giving
    ``sigma2/n [rho^2 + (1 - rho^2)/f]`` (independent of ``kappa``).
    ``beta = 0`` gives plain subsampling, ``sigma2 / n_c``; ``f = 1`` gives
    backprop, ``sigma2 / n``.
    """
    f = _fraction(control_fraction)
    n = _real("batch_size", batch_size, 1.0, None)
    s2 = _real("sigma2", sigma2, 0.0, None)
    r = _rho(rho)
    k = _real("kappa", kappa, 0.0, None)
    if beta is None:
        sigma_x2 = s2 * (1.0 - r * r)
    else:
        b = _real("beta", beta)
        sigma_x2 = s2 * (1.0 - 2.0 * b * k * r + b * b * k * k)
    n_c = f * n
    return s2 / n + sigma_x2 * (1.0 / n_c - 1.0 / n)


def backprop_variance(batch_size, sigma2):
    """Trace variance of the plain mini-batch gradient: ``sigma2 / n``."""
    n = _real("batch_size", batch_size, 1.0, None)
    s2 = _real("sigma2", sigma2, 0.0, None)
    return s2 / n


def relative_efficiency(control_fraction, cost_ratio, rho, overhead=0.0):
    """(Variance x compute) of the estimator at ``beta*`` over that of backprop.

    ``R = [rho^2 + (1 - rho^2)/f] (f + (1 - f) c + o)``: the ``sigma2/n`` and ``n``
    factors cancel; ``o`` is the predictor's own work per step (fit, prediction)
    relative to a full step, which plain backprop does not pay.  ``R < 1`` means
    the method reaches a given gradient noise level with less compute than
    backprop; ``R = 1`` at ``f = 1`` without overhead.
    """
    f = _fraction(control_fraction)
    c = _cost(cost_ratio)
    r = _rho(rho)
    o = _real("overhead", overhead, 0.0, None)
    r2 = r * r
    return (r2 + (1.0 - r2) / f) * (f + (1.0 - f) * c + o)


def break_even_rho2(control_fraction, cost_ratio, overhead=0.0):
    """Squared alignment at which ``relative_efficiency == 1``: ``(s - f) / (s (1 - f))``, ``s = f + (1-f) c + o``.

    Derived from ``[rho^2 + (1-rho^2)/f] s = 1`` (module docstring); without
    overhead it is ``c / (f + (1-f) c)``.  For ``f < 1`` the method wins iff
    ``rho^2`` exceeds this value.  At ``f = 1`` it is ``(c + o) / (1 + o)``, the
    level above which lowering ``f`` from 1 starts to pay (``dR/df > 0`` at 1);
    without overhead, ``c``.  With ``c = 0`` and no overhead the value is 0 (any
    nonzero alignment wins); with ``c = 1`` it is 1 (never wins).
    """
    f = _fraction(control_fraction)
    c = _cost(cost_ratio)
    o = _real("overhead", overhead, 0.0, None)
    if f == 1.0:
        return (c + o) / (1.0 + o)
    s = f + (1.0 - f) * c + o
    return min(1.0, (s - f) / (s * (1.0 - f)))


def break_even_alignment(control_fraction, cost_ratio):
    """Break-even ``|rho|``: ``sqrt(c / (f + (1-f) c))``."""
    return math.sqrt(break_even_rho2(control_fraction, cost_ratio))


def optimal_control_fraction(rho, cost_ratio, min_fraction=0.05, overhead=0.0):
    """Control fraction minimising ``relative_efficiency`` over ``[min_fraction, 1]``.

    ``dR/df = rho^2 (1-c) - (1-rho^2) (c+o) / f^2`` vanishes at
    ``f* = sqrt((1-rho^2) (c+o) / (rho^2 (1-c)))``; ``R`` is convex in ``f`` so the
    constrained optimum is ``f*`` clipped to ``[min_fraction, 1]``.  Returns
    ``1.0`` (plain backprop, which pays no overhead) whenever the best efficiency
    is not below 1, i.e. without overhead ``rho^2 <= c``.  Edge cases: ``rho = 0``
    or ``c = 1`` -> 1.0; ``c = o = 0`` with ``rho != 0`` -> ``min_fraction``;
    ``|rho| = 1`` with ``c < 1`` -> ``min_fraction``.
    """
    r = _rho(rho)
    c = _cost(cost_ratio)
    o = _real("overhead", overhead, 0.0, None)
    f_min = _real("min_fraction", min_fraction, 0.0, 1.0, lo_open=True)
    r2 = r * r
    if r2 <= c or c >= 1.0:
        # includes rho = 0 and c = 1: best achievable R is >= 1.
        return 1.0
    # here r2 > c >= 0 and c < 1, so the denominator is positive.
    f_star = math.sqrt((1.0 - r2) * (c + o) / (r2 * (1.0 - c)))
    f = min(max(f_star, f_min), 1.0)
    if f >= 1.0 or relative_efficiency(f, c, r, o) >= 1.0:  # guard against round-off near break-even
        return 1.0
    return f


def best_relative_efficiency(rho, cost_ratio, min_fraction=0.05):
    """``relative_efficiency`` at ``optimal_control_fraction``.

    Unclipped this is ``(|rho| sqrt(c) + sqrt((1-rho^2)(1-c)))^2``, i.e.
    ``cos^2(theta - phi)`` with ``rho = cos theta``, ``sqrt(c) = cos phi``.
    """
    f = optimal_control_fraction(rho, cost_ratio, min_fraction)
    return relative_efficiency(f, cost_ratio, rho)
