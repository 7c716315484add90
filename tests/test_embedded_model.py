"""The embedded qtutor-tiny: loads offline, and shows the effects the book teaches (its card's
quality bar, re-measured here on a slice of the held-out text)."""

import copy
import json
import math

import pytest
import torch

import qtutor
from qtutor.data import dataset_text, tokenize
from qtutor.eval import perplexity
from qtutor.models import embedded_model_dir

SEQLEN, TOKENS = 512, 16 * 512


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = qtutor.load_model("qtutor-tiny")
    ids = tokenize(tok, dataset_text("embedded", "eval"))
    return model, tok, ids


def ppl(model, ids):
    return perplexity(model, ids, SEQLEN, max_tokens=TOKENS, batch_size=4).ppl


def test_architecture_matches_the_issue(tiny):
    model, tok, ids = tiny
    c = model.config
    assert c.model_type == "qwen2" and c.num_key_value_heads < c.num_attention_heads  # GQA
    assert c.tie_word_embeddings and c.hidden_size % 128 == 0 and c.intermediate_size % 128 == 0
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert 2e6 <= sum(p.numel() for p in model.parameters()) <= 8e6
    assert (embedded_model_dir() / "model.safetensors").stat().st_size <= 16 * 2**20
    assert 4000 <= len(tok) <= 8192 and ids.numel() >= 100_000


def test_auto_classes_load_offline(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = str(embedded_model_dir())
    AutoModelForCausalLM.from_pretrained(d)
    text = dataset_text("embedded", "eval")[:3000]
    assert (
        AutoTokenizer.from_pretrained(d)(text).input_ids == PreTrainedTokenizerFast.from_pretrained(d)(text).input_ids
    )


def test_quality_bar(tiny):
    model, tok, ids = tiny
    base = ppl(model, ids)
    calib = tokenize(tok, dataset_text("embedded", "calib"))
    counts = torch.bincount(calib, minlength=model.config.vocab_size).double() + 1
    unigram = math.exp(-float(torch.log(counts / counts.sum())[ids[:TOKENS]].mean()))
    assert base < unigram / 5
    assert ppl(copy.deepcopy(model).half().float(), ids) == pytest.approx(base, rel=0.005)
    results = {}
    for name, cfg in (
        ("int8", qtutor.RTNConfig(8, 0, sym=True)),
        ("int4_pc", qtutor.RTNConfig(4, 0)),
        ("int4_g128", qtutor.RTNConfig(4, 128)),
    ):
        m = copy.deepcopy(model)
        qtutor.quantize(m, "rtn_int8" if name == "int8" else "rtn_int4", cfg)
        results[name] = ppl(m, ids)
    assert results["int8"] == pytest.approx(base, rel=0.01)
    assert results["int4_pc"] > results["int4_g128"] > base


def test_card_reports_its_measurements():
    card = (embedded_model_dir() / "MODEL_CARD.md").read_text()
    m = json.loads((embedded_model_dir() / "measurements.json").read_text())
    assert f"{m['fp16']:.3f}" in card and f"{m['unigram']:.2f}" in card
    assert m["rtn_int4_per_channel"] > m["rtn_int4_g128"]
