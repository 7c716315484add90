"""benchmarks/_common.py's kl_to_reference, the metric beside perplexity in peers.py --kl."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import kl_to_reference  # noqa: E402

IDS = torch.randint(0, 128, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))


def test_identical_models_are_at_zero():
    model = tiny_model()
    r = kl_to_reference(model, model, IDS, seqlen=16, batch_size=2)
    assert r["kl_to_float"] == 0.0
    assert r["top1_agree"] == 1.0


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
