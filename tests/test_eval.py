"""Metrics: perplexity protocol, memory accounting, latency."""

import math

import pytest
import torch

import qtutor
from qtutor.data import calibration_windows, eval_windows
from qtutor.eval import decode_latency, hf_generate_latency, memory_report, perplexity
from qtutor.eval.latency import greedy_decode, hf_generate


class Uniform(torch.nn.Module):
    """A 'language model' whose logits are all equal: perplexity must be its vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, **kw):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})()


@pytest.mark.parametrize("vocab", [2, 17, 512])
@pytest.mark.parametrize("stride", [None, 8])
def test_uniform_logits_perplexity_equals_vocab(vocab, stride):
    ids = torch.randint(0, vocab, (100,))
    r = perplexity(Uniform(vocab), ids, seqlen=16, stride=stride)
    assert r.ppl == pytest.approx(vocab, rel=1e-5)


def test_windows_drop_remainder_and_count_tokens():
    ids = torch.arange(100)
    w = eval_windows(ids, 16)
    assert w.shape == (6, 16) and w[1, 0] == 16
    r = perplexity(Uniform(100), ids, seqlen=16)
    assert r.eval_tokens == 96 and r.scored_tokens == 6 * 15
    assert perplexity(Uniform(100), ids, seqlen=16, max_tokens=40).eval_tokens == 32


def test_perplexity_does_not_depend_on_batch_size(model):
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(1))
    a = perplexity(model, ids, 32, batch_size=1).ppl
    b = perplexity(model, ids, 32, batch_size=4).ppl
    assert a == pytest.approx(b, rel=1e-5)


def test_perplexity_matches_hf_loss(model):
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(2))
    loss = model(ids[None, :32], labels=ids[None, :32]).loss
    loss2 = model(ids[None, 32:], labels=ids[None, 32:]).loss
    assert perplexity(model, ids, 32).ppl == pytest.approx(math.exp((loss + loss2).item() / 2), rel=1e-5)


def test_text_too_short_errors():
    with pytest.raises(qtutor.QtutorError, match="fewer than one window"):
        eval_windows(torch.arange(10), 16)


def test_calibration_windows_are_seeded():
    ids = torch.arange(1000)
    a, b = calibration_windows(ids, 4, 32, seed=3), calibration_windows(ids, 4, 32, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 32)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous windows


def test_memory_counts_tied_embeddings_once(model):
    rep = memory_report(model)
    n = sum(p.numel() for p in model.parameters())  # parameters() dedups the tied head
    bufs = sum(b.numel() * b.element_size() for b in model.buffers())
    assert rep.total_bytes == 4 * n + bufs
    assert rep.embeddings_bytes == 4 * model.model.embed_tokens.weight.numel()


def test_memory_shrinks_with_quantization(model):
    before = memory_report(model)
    qtutor.quantize(model, "rtn_int4", qtutor.RTNConfig(4, 32))
    after = memory_report(model)
    assert after.embeddings_bytes == before.embeddings_bytes
    assert after.linears_bytes < before.linears_bytes / 5  # fp32 -> ~4.6 bits


def test_latency_reports_positive_median(model):
    r = decode_latency(model, torch.arange(8), new_tokens=5, runs=3)
    assert r.ms_per_token > 0 and len(r.runs_ms_per_token) == 3 and r.new_tokens == 5


def test_hf_generate_decodes_the_same_tokens_as_the_book_loop(model):
    """The "what a user would pick instead" row times the same greedy decode: generate with a
    static cache gives the tokens of the package's own loop (dynamic cache)."""
    prompt = torch.arange(3, 11)
    ours, _, _ = greedy_decode(model, prompt, 6)
    assert torch.equal(hf_generate(model, prompt, 6), ours)


def test_hf_generate_latency_fields(model):
    r = hf_generate_latency(model, torch.arange(8), new_tokens=4, runs=2, compile=False)
    assert r.ms_per_token >= 0 and r.prefill_ms > 0 and len(r.runs_ms_per_token) == 2 and r.new_tokens == 4
    assert r.dtype == "float32" and r.device == "cpu"
