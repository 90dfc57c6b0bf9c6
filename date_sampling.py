"""Which dates of a SEN12MS-CR-TS series are the inputs and which is the target, from each date's cloud coverage
(numpy only; no file I/O).

The published protocol is UnCRtainTS's fixed sampler (data/dataLoader.py, SEN12MSCRTS.fixed_sampler), which its
validation and test sets use (model/train_reconstruct.py builds them with the dataset's defaults: sampler "fixed",
min_cov 0.0, max_cov 1.0; model/parse_args.py has the same --min_cov/--max_cov defaults for training):
- target: `np.argsort(coverage)[0]`, the least cloudy date (its comment: "the (earliest) least cloudy sample");
- inputs: the first n dates whose coverage lies in [min_cov, max_cov], else the first n dates other than the target;
- coverage_match: False when the inputs fell back, or the target's coverage is above 1e-3 (their clear_tresh).
Read as written, the first branch does not leave the target out: with min_cov 0 and max_cov 1 every date qualifies,
the inputs are dates 0..n-1, and whenever the least cloudy date is one of them the network is given its own target
as an input. "published" keeps that rule (to reproduce published figures); "leak_free", the project's default, is
the same rule with the target taken out of the candidate inputs, so it never happens.
"""
from dataclasses import dataclass

import numpy as np

SAMPLERS = {
    "leak_free": "target = the earliest least cloudy date; inputs = the first n other dates whose coverage lies in "
                 "[min_cov, max_cov], else the first n dates other than the target (never the target itself)",
    "published": "UnCRtainTS's fixed sampler as written: target = np.argsort(coverage)[0]; inputs = the first n dates "
                 "whose coverage lies in [min_cov, max_cov] (the target included when it is among them), else the "
                 "first n dates other than the target",
}
DEFAULT_SAMPLER = "leak_free"
CLEAR_COVERAGE = 1e-3  # their clear_tresh: a target cloudier than this is flagged (coverage_match False)
MIN_COVERAGE, MAX_COVERAGE = 0.0, 1.0  # their min_cov, max_cov defaults: every date qualifies as an input


@dataclass(frozen=True)
class DateChoice:
    """Date indices into a series: inputs in time order, the target; coverage_match as the published sampler sets
    it (inputs met [min_cov, max_cov] and the target is clear)."""
    inputs: tuple
    target: int
    coverage_match: bool

    @property
    def target_is_input(self):
        return self.target in self.inputs


def _coverage(coverage):
    coverage = np.asarray(coverage, dtype=np.float64)
    if coverage.ndim != 1 or coverage.size == 0 or not np.isfinite(coverage).all():
        raise ValueError(f"coverage must be a non-empty 1-D array of finite fractions, got {coverage!r}")
    return coverage


def published_fixed_sampler(coverage, n_inputs, min_cov=MIN_COVERAGE, max_cov=MAX_COVERAGE):
    """UnCRtainTS's SEN12MSCRTS.fixed_sampler, statement by statement (see the module docstring)."""
    coverage = _coverage(coverage)
    target = int(np.argsort(coverage)[0])
    inputs = [i for i, c in enumerate(coverage) if min_cov <= c <= max_cov][:n_inputs]
    match = len(inputs) >= n_inputs
    if not match:
        inputs = [i for i in range(len(coverage)) if i != target][:n_inputs]
    return DateChoice(tuple(inputs), target, bool(match and coverage[target] <= CLEAR_COVERAGE))


def leak_free_sampler(coverage, n_inputs, min_cov=MIN_COVERAGE, max_cov=MAX_COVERAGE):
    """The published rule with the target left out of the candidate inputs; the target is the earliest least cloudy
    date (np.argmin), what the published comment says argsort gives (argsort's order among equal coverages is
    numpy's choice)."""
    coverage = _coverage(coverage)
    target = int(np.argmin(coverage))
    others = [i for i in range(len(coverage)) if i != target]
    inputs = [i for i in others if min_cov <= coverage[i] <= max_cov][:n_inputs]
    match = len(inputs) >= n_inputs
    if not match:
        inputs = others[:n_inputs]
    return DateChoice(tuple(inputs), target, bool(match and coverage[target] <= CLEAR_COVERAGE))


_SAMPLER_FUNCTIONS = {"leak_free": leak_free_sampler, "published": published_fixed_sampler}


def sample_dates(coverage, n_inputs, sampler=DEFAULT_SAMPLER, min_cov=MIN_COVERAGE, max_cov=MAX_COVERAGE):
    """The DateChoice of a series under a sampler of SAMPLERS."""
    if sampler not in _SAMPLER_FUNCTIONS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {tuple(SAMPLERS)}")
    if n_inputs < 1:
        raise ValueError(f"need at least one input date, got {n_inputs}")
    return _SAMPLER_FUNCTIONS[sampler](coverage, n_inputs, min_cov, max_cov)


def published_leaks(coverages, n_inputs, min_cov=MIN_COVERAGE, max_cov=MAX_COVERAGE):
    """How many of the series (each a sequence of per-date coverages) the published sampler gives their own target as
    an input: (count, number of series)."""
    count = sum(published_fixed_sampler(c, n_inputs, min_cov, max_cov).target_is_input for c in coverages)
    return count, len(coverages)


def leak_probability(n_dates=30, n_clear=1, n_inputs=3):
    """Chance that the published sampler (defaults) gives the target as an input when `n_clear` of `n_dates` dates
    are equally least cloudy, placed at random, and the earliest of them is the target: 1 - C(T-n, k) / C(T, k)."""
    import math
    return 1.0 - math.comb(n_dates - n_inputs, n_clear) / math.comb(n_dates, n_clear)


def simulated_leak_rate(n_dates=30, n_clear=1, n_inputs=3, trials=20000, seed=0):
    """The same chance measured: `trials` series of random coverages in [0.05, 1) with `n_clear` dates at 0, placed
    at random, through published_fixed_sampler, so the target among equal minima is whichever np.argsort puts first
    on this machine (not always the earliest: numpy's default sort is not stable)."""
    rng = np.random.default_rng(seed)
    leaks = 0
    for _ in range(trials):
        coverage = rng.uniform(0.05, 1.0, size=n_dates)
        coverage[rng.choice(n_dates, n_clear, replace=False)] = 0.0
        leaks += published_fixed_sampler(coverage, n_inputs).target_is_input
    return leaks / trials
