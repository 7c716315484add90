"""Per-window losses of the perplexity evaluation and the bootstrap intervals built on them."""

import math

import numpy as np
import pytest
import torch

from qtutor.errors import QtutorError
from qtutor.eval import perplexity
from qtutor.eval.ppl import bootstrap_mean, bootstrap_mean_diff, bootstrap_ppl, bootstrap_ppl_ratio


def test_two_windows_known_answer():
    """Resamples of two windows have mean a, (a+b)/2 or b with chances 1/4, 1/2, 1/4: the central
    95% of them runs exactly from a to b."""
    a, b = 2.0, 3.0
    low, high = bootstrap_ppl([a, b], n_boot=4000, seed=0)
    assert low == pytest.approx(math.exp(a), rel=1e-12) and high == pytest.approx(math.exp(b), rel=1e-12)
    # a narrower interval falls inside: the 40% in the middle is the midpoint alone
    assert bootstrap_ppl([a, b], n_boot=4000, level=0.4, seed=0) == pytest.approx((math.exp(2.5),) * 2, rel=1e-12)


def test_one_window_or_equal_windows_give_the_point():
    assert bootstrap_ppl([1.5]) == pytest.approx((math.exp(1.5),) * 2, rel=1e-12)
    assert bootstrap_ppl([0.7] * 9) == pytest.approx((math.exp(0.7),) * 2, rel=1e-12)


def test_fixed_seed_is_deterministic_and_the_interval_holds_the_estimate():
    rng = np.random.default_rng(123)
    for trial in range(20):
        nll = list(2.5 + 0.3 * rng.standard_normal(int(rng.integers(3, 40))))
        ci = bootstrap_ppl(nll, n_boot=500, seed=trial)
        assert ci == bootstrap_ppl(nll, n_boot=500, seed=trial)
        assert ci[0] <= math.exp(np.mean(nll)) <= ci[1]
    nll = list(2.5 + 0.3 * rng.standard_normal(30))
    assert bootstrap_ppl(nll, seed=0) != bootstrap_ppl(nll, seed=1)  # the seed matters


def test_interval_narrows_with_more_windows():
    rng = np.random.default_rng(0)
    few, many = 2.5 + 0.3 * rng.standard_normal(8), 2.5 + 0.3 * rng.standard_normal(800)
    (lo_f, hi_f), (lo_m, hi_m) = bootstrap_ppl(list(few)), bootstrap_ppl(list(many))
    assert hi_m / lo_m < hi_f / lo_f


def test_paired_ratio_cancels_what_the_windows_share():
    """Model b is model a plus 0.01 nats on every window: the paired ratio is exactly exp(-0.01),
    however much the windows differ from one another."""
    rng = np.random.default_rng(1)
    a = list(2.0 + rng.standard_normal(16))
    b = [v + 0.01 for v in a]
    assert bootstrap_ppl_ratio(a, b) == pytest.approx((math.exp(-0.01),) * 2, rel=1e-9)
    lo_a, hi_a = bootstrap_ppl(a)
    assert hi_a / lo_a > 1.5  # each model alone: a wide interval


def test_mean_interval_and_paired_difference_known_answers():
    """The plain mean's interval is the perplexity's without the exp; a paired difference of a
    constant shift is that shift exactly, and of identical figures exactly zero."""
    a, b = 2.0, 3.0
    assert bootstrap_mean([a, b], n_boot=4000, seed=0) == pytest.approx((a, b), rel=1e-12)
    rng = np.random.default_rng(2)
    x = list(0.3 + 0.1 * rng.standard_normal(50))
    low, high = bootstrap_mean(x)
    assert (math.exp(low), math.exp(high)) == pytest.approx(bootstrap_ppl(x), rel=1e-12)
    assert low < float(np.mean(x)) < high
    assert bootstrap_mean_diff(x, x) == (0.0, 0.0)
    shifted = [v - 0.02 for v in x]
    assert bootstrap_mean_diff(x, shifted) == pytest.approx((0.02, 0.02), rel=1e-9)
    assert bootstrap_mean_diff(shifted, x) == pytest.approx((-0.02, -0.02), rel=1e-9)
    # the pairing is what removes the windows' spread: unpaired, the two intervals overlap
    assert bootstrap_mean(shifted)[1] > bootstrap_mean(x)[0]
    with pytest.raises(QtutorError, match="same windows"):
        bootstrap_mean_diff([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bootstrap_ppl([]), "non-empty"),
        (lambda: bootstrap_ppl([1.0, float("nan")]), "finite"),
        (lambda: bootstrap_ppl([1.0, 2.0], level=1.5), "between 0 and 1"),
        (lambda: bootstrap_ppl([1.0, 2.0], n_boot=0), "at least 1"),
        (lambda: bootstrap_ppl_ratio([1.0, 2.0], [1.0]), "same windows"),
    ],
)
def test_bad_input_one_line(call, message):
    with pytest.raises(QtutorError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("stride", [None, 8])
def test_window_losses_are_each_windows_own_and_leave_the_perplexity_as_it_was(model, stride):
    ids = torch.randint(0, 128, (32 * 5 + 7,), generator=torch.Generator().manual_seed(3))
    r = perplexity(model, ids, 32, batch_size=2, stride=stride)
    assert len(r.window_nll) * (31 if stride is None else stride) == r.scored_tokens
    assert math.exp(float(np.mean(r.window_nll))) == pytest.approx(r.ppl, rel=1e-6)  # float32 sums
    if stride is None:  # each window alone gives its own loss, in order
        for i, v in enumerate(r.window_nll):
            assert math.log(perplexity(model, ids[32 * i : 32 * (i + 1)], 32).ppl) == pytest.approx(v, rel=1e-5)
    # the perplexity is the total NLL over the count, as before the windows were kept
    same = perplexity(model, ids, 32, batch_size=1, stride=stride)
    assert same.ppl == pytest.approx(r.ppl, rel=1e-6) and same.nll == pytest.approx(r.nll, rel=1e-6)
