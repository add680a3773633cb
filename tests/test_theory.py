"""Tests for lgp_hf.theory.

The variance formula is checked against a Monte Carlo simulation of the actual
estimator (not against itself); the break-even and optimal-fraction formulas
are checked against bisection / brute-force grid search on relative_efficiency.
"""

import math

import pytest
import torch

from lgp_hf.theory import (
    backprop_variance,
    best_relative_efficiency,
    break_even_alignment,
    break_even_rho2,
    cost_ratio_from_backward_forward,
    cost_ratio_from_times,
    estimator_variance,
    optimal_beta,
    optimal_control_fraction,
    relative_efficiency,
    step_cost_ratio,
)

# --------------------------------------------------------------------------
# Monte Carlo set-up
# --------------------------------------------------------------------------

DIM = 20
POP = 4000          # finite population; batches are drawn iid (with replacement) from it
DRAWS = 40_000      # Monte Carlo repetitions per configuration
CHUNK = 10_000
BATCH = 16
RHO_TARGET = 0.8
KAPPA_TARGET = 1.3


def _population(seed=0):
    """Per-example gradients g_i and predictions ĝ_i with known moments.

    Anisotropic, skewed (non-Gaussian) noise; ĝ has a different mean from g so
    that a biased estimator would be visible.  Returns tensors plus the exact
    population moments (sigma2, rho, kappa, mean of g).
    """
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 2.0, DIM, dtype=torch.float64)

    def noise():
        a = torch.randn(POP, DIM, generator=gen, dtype=torch.float64)
        b = torch.randn(POP, DIM, generator=gen, dtype=torch.float64)
        return (a + 0.5 * (b * b - 1.0)) * scales

    z, w = noise(), noise()
    mu = torch.randn(DIM, generator=gen, dtype=torch.float64)
    mu_hat = mu + 0.5 * scales
    g = mu + z
    gh = mu_hat + KAPPA_TARGET * (RHO_TARGET * z + math.sqrt(1 - RHO_TARGET**2) * w)

    gc = g - g.mean(0)
    hc = gh - gh.mean(0)
    sigma2 = (gc * gc).sum(1).mean().item()          # population (1/M) moments:
    var_hat = (hc * hc).sum(1).mean().item()         # exact for iid draws from
    cov = (gc * hc).sum(1).mean().item()             # the finite population
    rho = cov / math.sqrt(sigma2 * var_hat)
    kappa = math.sqrt(var_hat / sigma2)
    return g, gh, g.mean(0), gh.mean(0), sigma2, rho, kappa


@pytest.fixture(scope="module")
def population():
    return _population()


def _simulate(g, gh, n, n_c, seed):
    """Draw DRAWS batches B (n iid examples) with a uniformly random control
    subset C of size n_c.  Returns (mean_C g, mean_B ĝ - mean_C ĝ, mean_B ĝ), so
    that est(beta) = mean_C (g - beta ĝ) + beta mean_B ĝ
                   = out[0] + beta * out[1]  (common random numbers over beta).
    """
    gen = torch.Generator().manual_seed(seed)
    mc_g, diff, mb_h = [], [], []
    for _ in range(DRAWS // CHUNK):
        idx = torch.randint(0, g.shape[0], (CHUNK, n), generator=gen)
        G, H = g[idx], gh[idx]                                   # (CHUNK, n, d)
        perm = torch.rand(CHUNK, n, generator=gen).argsort(dim=1)[:, :n_c]
        sel = perm.unsqueeze(-1).expand(-1, -1, g.shape[1])
        Gc = torch.gather(G, 1, sel)
        Hc = torch.gather(H, 1, sel)
        mean_b_h = H.mean(1)
        mc_g.append(Gc.mean(1))
        diff.append(mean_b_h - Hc.mean(1))
        mb_h.append(mean_b_h)
    return torch.cat(mc_g), torch.cat(diff), torch.cat(mb_h)


def _trace_var_with_se(est, mean):
    """Unbiased estimate of tr Var(est) using the known true mean, with its MC
    standard error: q_r = ||est_r - E est||^2 has mean tr Var exactly."""
    q = ((est - mean) ** 2).sum(1)
    return q.mean().item(), q.std().item() / math.sqrt(q.numel())


def _bias_chi2(est, mean):
    """Sum over coordinates of squared z-scores of the MC mean against ``mean``;
    ~ chi^2 with DIM degrees of freedom if est is unbiased."""
    m = est.mean(0)
    se = est.std(0) / math.sqrt(est.shape[0])
    return (((m - mean) / se) ** 2).sum().item()


# chi^2_20 has 99.9% quantile ~45.3
CHI2_LIMIT = 45.3


@pytest.mark.parametrize("fraction,seed", [(0.25, 1), (0.5, 2)])
def test_variance_formula_matches_monte_carlo(population, fraction, seed):
    g, gh, mu, _, sigma2, rho, kappa = population
    assert abs(rho - RHO_TARGET) < 0.05 and abs(kappa - KAPPA_TARGET) < 0.1
    n = BATCH
    n_c = int(round(fraction * n))
    mc_g, diff, _ = _simulate(g, gh, n, n_c, seed)

    beta_star = optimal_beta(rho, kappa)
    assert beta_star == pytest.approx(rho / kappa)
    betas = [0.0, 0.3, beta_star, 1.0, 1.5]
    empirical = {}
    for beta in betas:
        est = mc_g + beta * diff
        v_emp, se = _trace_var_with_se(est, mu)
        empirical[beta] = v_emp
        v_theory = estimator_variance(fraction, n, sigma2, rho, beta=beta, kappa=kappa)
        # MC standard error is ~0.3-0.5 % of the variance at 40k draws; require
        # agreement within 4 standard errors and that the check is sharp (SE < 1.5 %).
        assert se < 0.015 * v_theory
        assert abs(v_emp - v_theory) < 4 * se, (beta, v_emp, v_theory, se)
        assert abs(v_emp - v_theory) < 0.03 * v_theory

        # Power check: the same data reject the formula without the
        # finite-population term (-1/n), i.e. sigma2/n + sigma_X^2/n_c.
        sigma_x2 = sigma2 * (1 - 2 * beta * kappa * rho + beta**2 * kappa**2)
        wrong = sigma2 / n + sigma_x2 / n_c
        assert abs(v_emp - wrong) > 8 * se

    # beta=None means the optimal beta
    v_opt = estimator_variance(fraction, n, sigma2, rho, kappa=kappa)
    assert v_opt == pytest.approx(
        estimator_variance(fraction, n, sigma2, rho, beta=beta_star, kappa=kappa), rel=1e-12
    )
    assert v_opt == pytest.approx(sigma2 / n * (rho**2 + (1 - rho**2) / fraction), rel=1e-12)
    # beta* gives the smallest simulated variance (common random numbers)
    assert empirical[beta_star] == min(empirical.values())
    # beta = 0 is plain subsampling of the control batch
    assert empirical[0.0] == pytest.approx(sigma2 / n_c, rel=0.03)


def test_unbiased_monte_carlo(population):
    g, gh, mu, mu_hat, sigma2, rho, kappa = population
    mc_g, diff, mean_b_h = _simulate(g, gh, BATCH, 4, seed=3)
    for beta in [0.0, optimal_beta(rho, kappa), 1.5]:
        chi2 = _bias_chi2(mc_g + beta * diff, mu)
        assert chi2 < CHI2_LIMIT, (beta, chi2)
    # Power check: the prediction-only estimate mean_B ĝ is biased (E ĝ != E g)
    # and the same test detects it by a wide margin.
    assert _bias_chi2(mean_b_h, mu) > 100 * CHI2_LIMIT
    assert _bias_chi2(mean_b_h, mu_hat) < CHI2_LIMIT


def test_relative_efficiency_matches_variance_times_cost():
    for f in [0.05, 0.2, 0.5, 1.0]:
        for c in [0.0, 0.25, 1 / 3, 1.0]:
            for rho in [-0.9, 0.0, 0.5, 0.99]:
                n, s2 = 64, 3.7
                ratio = (
                    estimator_variance(f, n, s2, rho) * step_cost_ratio(f, c) * n
                    / (backprop_variance(n, s2) * n)
                )
                assert relative_efficiency(f, c, rho) == pytest.approx(ratio, rel=1e-12)


def test_special_cases():
    # f = 1 is backprop whatever the predictor
    assert estimator_variance(1.0, 32, 2.0, 0.3, beta=0.7, kappa=2.0) == pytest.approx(2.0 / 32)
    assert relative_efficiency(1.0, 0.4, 0.1) == pytest.approx(1.0)
    assert step_cost_ratio(0.25, 1 / 3) == pytest.approx(0.5)
    assert step_cost_ratio(1.0, 0.0) == 1.0
    assert cost_ratio_from_backward_forward(2.0) == pytest.approx(1 / 3)
    assert cost_ratio_from_backward_forward(0.0) == 1.0
    assert cost_ratio_from_times(1.0, 3.0) == pytest.approx(1 / 3)
    assert cost_ratio_from_times(3.5, 3.0) == 1.0  # clipped
    # Typical numbers: r = 2, f = 1/4 -> c = 1/3, break-even rho^2 = 2/3
    assert break_even_rho2(0.25, 1 / 3) == pytest.approx(2 / 3)
    assert break_even_alignment(0.25, 1 / 3) == pytest.approx(math.sqrt(2 / 3))


F_GRID = [0.05, 0.1, 0.25, 0.5, 0.9]
C_GRID = [0.0, 0.1, 1 / 3, 0.5, 0.9, 1.0]


def _bisect_break_even(f, c):
    """rho^2 with relative_efficiency == 1, found numerically (R decreasing in rho^2)."""
    lo, hi = 0.0, 1.0
    if relative_efficiency(f, c, 0.0) <= 1.0:
        return 0.0
    if relative_efficiency(f, c, 1.0) >= 1.0:
        return 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if relative_efficiency(f, c, math.sqrt(mid)) > 1.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("f", F_GRID)
@pytest.mark.parametrize("c", C_GRID)
def test_break_even(f, c):
    rho2 = break_even_rho2(f, c)
    assert 0.0 <= rho2 <= 1.0
    assert break_even_alignment(f, c) == pytest.approx(math.sqrt(rho2))
    assert relative_efficiency(f, c, math.sqrt(rho2)) == pytest.approx(1.0, abs=1e-12)
    assert rho2 == pytest.approx(_bisect_break_even(f, c), abs=1e-9)
    for delta in [0.01, 0.1, 0.3]:
        above = rho2 + delta
        below = rho2 - delta
        if above <= 1.0:
            assert relative_efficiency(f, c, math.sqrt(above)) < 1.0
            assert relative_efficiency(f, c, -math.sqrt(above)) < 1.0  # sign of rho irrelevant
        if below >= 0.0:
            assert relative_efficiency(f, c, math.sqrt(below)) > 1.0


RHO_GRID = [-0.9, 0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0]


@pytest.mark.parametrize("rho", RHO_GRID)
@pytest.mark.parametrize("c", [0.0, 0.05, 1 / 3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("min_fraction", [0.05, 0.2])
def test_optimal_control_fraction_minimises_on_grid(rho, c, min_fraction):
    f_opt = optimal_control_fraction(rho, c, min_fraction=min_fraction)
    assert min_fraction <= f_opt <= 1.0
    grid = torch.linspace(min_fraction, 1.0, 200_001, dtype=torch.float64)
    r2 = rho * rho
    values = (r2 + (1 - r2) / grid) * (grid + (1 - grid) * c)   # brute force
    # spot-check the vectorised grid against the library function
    for i in [0, 1234, 100_000, 200_000]:
        assert values[i].item() == pytest.approx(relative_efficiency(float(grid[i]), c, rho), rel=1e-12)
    r_opt = relative_efficiency(f_opt, c, rho)
    assert r_opt <= values.min().item() + 1e-9
    assert best_relative_efficiency(rho, c, min_fraction) == pytest.approx(r_opt)
    if values.min().item() >= 1.0 - 1e-12:
        assert f_opt == 1.0       # cannot beat backprop -> use backprop
    else:
        assert r_opt < 1.0
        # unique minimiser (R strictly convex when rho^2 < 1 and c > 0)
        if r2 < 1.0 and c > 0.0:
            assert abs(f_opt - grid[values.argmin()].item()) < 1e-3
    # unclipped closed form of the optimum
    if r2 > c and f_opt > min_fraction and f_opt < 1.0:
        closed = (abs(rho) * math.sqrt(c) + math.sqrt((1 - r2) * (1 - c))) ** 2
        assert r_opt == pytest.approx(closed, rel=1e-9)


def test_optimal_control_fraction_edge_cases():
    assert optimal_control_fraction(1.0, 1 / 3) == 0.05
    assert optimal_control_fraction(-1.0, 1 / 3, min_fraction=0.1) == 0.1
    assert optimal_control_fraction(0.9, 1.0) == 1.0
    assert optimal_control_fraction(1.0, 1.0) == 1.0
    assert optimal_control_fraction(0.5, 0.0) == 0.05
    assert optimal_control_fraction(0.0, 0.0) == 1.0
    assert optimal_control_fraction(0.0, 0.3) == 1.0
    # at / below break-even at every f: rho^2 <= c
    assert optimal_control_fraction(math.sqrt(0.3), 0.3) == 1.0
    assert optimal_control_fraction(0.5, 0.3) == 1.0
    # interior optimum: rho = 0.9, c = 1/3 -> f* = sqrt(0.19 * 0.5 / 0.81)
    assert optimal_control_fraction(0.9, 1 / 3) == pytest.approx(math.sqrt(0.19 * 0.5 / 0.81))


@pytest.mark.parametrize(
    "func,args,name",
    [
        (step_cost_ratio, (0.0, 0.5), "control_fraction"),
        (step_cost_ratio, (1.5, 0.5), "control_fraction"),
        (step_cost_ratio, (0.5, -0.1), "cost_ratio"),
        (step_cost_ratio, (0.5, 1.1), "cost_ratio"),
        (cost_ratio_from_backward_forward, (-1.0,), "backward_forward_ratio"),
        (cost_ratio_from_times, (1.0, 0.0), "full_time"),
        (cost_ratio_from_times, (-1.0, 1.0), "prediction_time"),
        (estimator_variance, (0.5, 0, 1.0, 0.5), "batch_size"),
        (estimator_variance, (0.5, 8, -1.0, 0.5), "sigma2"),
        (estimator_variance, (0.5, 8, 1.0, 1.5), "rho"),
        (estimator_variance, (0.5, 8, 1.0, 0.5, None, -1.0), "kappa"),
        (estimator_variance, (0.5, 8, 1.0, 0.5, float("nan")), "beta"),
        (estimator_variance, (-0.5, 8, 1.0, 0.5), "control_fraction"),
        (backprop_variance, (0.5, 1.0), "batch_size"),
        (backprop_variance, (8, float("inf")), "sigma2"),
        (relative_efficiency, (0.5, 0.3, -1.01), "rho"),
        (relative_efficiency, (0.0, 0.3, 0.5), "control_fraction"),
        (break_even_rho2, (0.5, 2.0), "cost_ratio"),
        (break_even_alignment, (2.0, 0.3), "control_fraction"),
        (optimal_control_fraction, (1.2, 0.3), "rho"),
        (optimal_control_fraction, (0.9, -0.3), "cost_ratio"),
        (optimal_control_fraction, (0.9, 0.3, 0.0), "min_fraction"),
        (optimal_control_fraction, (0.9, 0.3, 1.5), "min_fraction"),
        (optimal_beta, (0.5, 0.0), "kappa"),
        (step_cost_ratio, ("0.5", 0.3), "control_fraction"),
        (step_cost_ratio, (True, 0.3), "control_fraction"),
    ],
)
def test_bad_inputs_name_the_argument(func, args, name):
    with pytest.raises(ValueError, match=name) as info:
        func(*args)
    # message states the allowed range
    assert "must be" in str(info.value) and ("in [" in str(info.value) or "in (" in str(info.value))
