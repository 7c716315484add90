"""benchmarks/_common.py's kl_to_reference, the metric beside perplexity in peers.py --kl, its
per-window figures, peers.py's paired intervals built on them, and the held-out windows of
``--eval-text calib-heldout``."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import kl_to_reference, untouched_windows  # noqa: E402
from peers import compare, pairs  # noqa: E402

IDS = torch.randint(0, 128, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))


def test_identical_models_are_at_zero():
    model = tiny_model()
    r = kl_to_reference(model, model, IDS, seqlen=16, batch_size=2)
    assert r["kl_to_float"] == 0.0
    assert r["top1_agree"] == 1.0
    assert r["window_kl"] == [0.0, 0.0, 0.0]


def test_another_model_is_above_zero_and_matches_a_direct_computation():
    ref, other = tiny_model(seed=0), tiny_model(seed=1)
    r = kl_to_reference(other, ref, IDS, seqlen=16, batch_size=2)  # 3 windows: batches of 2 and 1
    windows = IDS[:48].view(3, 16)
    with torch.no_grad():
        p = F.log_softmax(ref(windows).logits[:, :-1], dim=-1)
        q = F.log_softmax(other(windows).logits[:, :-1], dim=-1)
    want = F.kl_div(q, p, log_target=True, reduction="sum") / (3 * 15)
    assert r["kl_to_float"] > 0
    assert abs(r["kl_to_float"] - float(want)) < 1e-5 * float(want)
    assert r["top1_agree"] == int((p.argmax(-1) == q.argmax(-1)).sum()) / (3 * 15)
    # each window's own mean, in order; their mean is the whole figure
    per_window = [float(F.kl_div(q[i], p[i], log_target=True, reduction="sum")) / 15 for i in range(3)]
    assert r["window_kl"] == pytest.approx(per_window, rel=1e-5)
    assert sum(r["window_kl"]) / 3 == pytest.approx(r["kl_to_float"], rel=1e-12)


def _rows(kl_qtutor, kl_reference, nll_qtutor, nll_reference, layout="INT4 per row, sym", method="rtn"):
    """Two rows of one layout and method, qtutor's and its reference's, and their per-window figures."""
    rows, samples = [], {}
    for impl, kl, nll in (("qtutor", kl_qtutor, nll_qtutor), ("llm-compressor", kl_reference, nll_reference)):
        mean_nll = sum(nll) / len(nll)
        rows.append(dict(layout=layout, method=method, implementation=impl, ppl=math.exp(mean_nll)))
        rows[-1]["kl_to_float"] = sum(kl) / len(kl)
        samples[layout, method, impl] = {"nll": nll, "kl": kl}
    return rows, samples


def test_pairs_of_identical_rows_are_at_zero_difference_and_ratio_one():
    g = torch.Generator().manual_seed(0)
    kl, nll = (torch.rand(40, generator=g) * 0.5).tolist(), (4 + torch.rand(40, generator=g)).tolist()
    rows, samples = _rows(kl, kl, nll, nll)
    (p,) = pairs(rows, samples)
    assert (p["layout"], p["method"], p["reference"], p["windows"]) == (
        "INT4 per row, sym",
        "rtn",
        "llm-compressor",
        40,
    )
    assert p["kl_diff"] == 0.0 and (p["kl_diff_lo"], p["kl_diff_hi"]) == (0.0, 0.0)
    assert p["ppl_ratio"] == 1.0 and (p["ppl_ratio_lo"], p["ppl_ratio_hi"]) == (1.0, 1.0)


def test_pairs_see_a_small_shift_that_the_windows_spread_hides():
    """qtutor's KL is the reference's minus 0.01 on every window, its NLL plus 0.001: the paired
    intervals are those shifts exactly, although each row's windows spread far wider."""
    g = torch.Generator().manual_seed(1)
    kl, nll = (torch.rand(40, generator=g) * 0.5).tolist(), (4 + torch.rand(40, generator=g)).tolist()
    rows, samples = _rows([v - 0.01 for v in kl], kl, [v + 0.001 for v in nll], nll)
    (p,) = pairs(rows, samples)
    assert p["kl_diff"] == pytest.approx(-0.01, rel=1e-9)
    assert (p["kl_diff_lo"], p["kl_diff_hi"]) == pytest.approx((-0.01, -0.01), rel=1e-9)
    assert (p["ppl_ratio_lo"], p["ppl_ratio_hi"]) == pytest.approx((math.exp(0.001),) * 2, rel=1e-9)
    # a reference that failed, or a row without one, makes no pair; without KLs a pair has the ratio only
    rows[1]["ppl"] = None
    assert pairs(rows, samples) == []
    rows, samples = _rows(kl, kl, nll, nll)
    del samples["INT4 per row, sym", "rtn", "qtutor"]["kl"]
    (p,) = pairs(rows, samples)
    assert "kl_diff" not in p and p["ppl_ratio"] == 1.0


def test_untouched_windows_leave_out_every_window_a_calibration_window_touches():
    ids = torch.arange(10 * 8)  # ten windows of 8 and no remainder
    kept = untouched_windows(ids, 8, starts=[3, 40], calib_seqlen=8)  # touches windows 0, 1 and 5
    assert kept.view(-1, 8)[:, 0].tolist() == [16, 24, 32, 48, 56, 64, 72]
    assert torch.equal(kept.view(-1, 8)[0], torch.arange(16, 24))
    assert untouched_windows(ids, 8, starts=[8], calib_seqlen=8).numel() == 9 * 8  # one window exactly


def test_compare_names_its_rows_and_refuses_unpaired_windows():
    """peers.compare, which peers.py and peers_explain.py --against share: the two rows' own
    figures under the given names, mine / theirs and mine - theirs with paired intervals."""
    a = {"nll": [1.0, 2.0, 3.0, 4.0], "kl": [0.10, 0.20, 0.30, 0.40]}
    b = {"nll": [v - 0.01 for v in a["nll"]], "kl": [v - 0.05 for v in a["kl"]]}
    mine, theirs = {"ppl": math.exp(2.5), "kl_to_float": 0.25}, {"ppl": math.exp(2.49), "kl_to_float": 0.20}
    got = compare(mine, theirs, a, b, names=("experiment", "llmc"))
    assert got["ppl_experiment"] == mine["ppl"] and got["kl_llmc"] == 0.20
    assert got["ppl_ratio_lo"] == pytest.approx(math.exp(0.01)) == got["ppl_ratio_hi"]
    assert got["kl_diff_lo"] == pytest.approx(0.05) == got["kl_diff_hi"]
    assert "kl_diff" not in compare(mine, theirs, {"nll": a["nll"]}, b)  # no per-window KL on one side
    with pytest.raises(ValueError, match="same windows"):
        compare(mine, theirs, a, {"nll": b["nll"][:3]})
