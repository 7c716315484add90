"""The lm_head quantized with each method's own format (``qtutor.quantize(..., head=True)``): a
tied embedding that reads its rows from the packed head, memory counted once, the calibrated
methods' head inputs, the CPU kernels and the decoders with such a head."""

import copy
import dataclasses

import pytest
import torch

import qtutor
from conftest import tiny_model
from qtutor import QtutorError
from qtutor.eval import memory_report
from qtutor.eval.latency import greedy_decode
from qtutor.quant.base import REGISTRY, QuantizedEmbedding, QuantizedLinear
from qtutor.runtime import kernels
from qtutor.runtime.decode import StaticDecoder

METHODS = ["rtn_int8", "rtn_int4", "gptq_int4", "awq_int4", "palettization_4bit", "qlora_nf4", "smoothquant_w8a8"]


def config(method):
    """The method's default config, with groups of 32 where it has groups (the tiny width is 64)."""
    cfg = qtutor.get_method(method).default_config
    if method != "rtn_int8" and "group_size" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = cfg.replace(group_size=32)
    return cfg


@pytest.fixture(scope="module")
def base():
    return tiny_model("qwen2", initializer_range=0.3)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def quantized(base, method, calib, head):
    model = copy.deepcopy(base)
    report = qtutor.quantize(model, method, config(method), calib=calib, head=head)
    return model, report


@pytest.mark.parametrize("method", METHODS)
def test_the_head_is_stored_once_in_the_methods_format(base, calib, method):
    plain, _ = quantized(base, method, calib, head=False)
    model, report = quantized(base, method, calib, head=True)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(head) is type(q_proj)  # the method's own storage format
    assert isinstance(emb, QuantizedEmbedding) and emb.head is head  # one module serves both
    assert sum(t.numel() for t in [*emb.buffers(recurse=False), *emb.parameters(recurse=False)]) == 0
    assert (emb.num_embeddings, emb.embedding_dim) == (base.config.vocab_size, base.config.hidden_size)
    vocab, hidden = head.out_features, head.in_features
    assert (vocab, hidden) == tuple(base.lm_head.weight.shape)

    # the lookup: rows of the packed head, dequantized, in the model's dtype
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(emb(ids), head.dequantize().float()[ids].to(torch.float32))
    assert emb(ids).dtype == base.model.embed_tokens.weight.dtype

    # memory: the float table (vocab x hidden float32) goes, the packed head comes, once
    m0, m1 = memory_report(plain), memory_report(model)
    assert m0.embeddings_bytes == vocab * hidden * base.lm_head.weight.element_size()
    assert m1.embeddings_bytes == head.nbytes == sum(b.numel() * b.element_size() for b in head.buffers())
    assert m1.linears_bytes == m0.linears_bytes and m1.other_bytes == m0.other_bytes
    assert m0.total_bytes - m1.total_bytes == vocab * hidden * 4 - head.nbytes > 0

    # the report: the head is a quantized linear of its own, tied, in the bits per weight
    entry = report.layers["lm_head"]
    assert report.head and entry["tied"] and entry["numel"] == vocab * hidden
    assert entry["bits_per_weight"] == head.bits_per_weight < 9
    assert 0 < entry["weight_rel_error"] < 0.2
    n = sum(e["numel"] for e in report.layers.values())
    assert report.bits_per_weight == pytest.approx(
        sum(e["bits_per_weight"] * e["numel"] for e in report.layers.values()) / n
    )

    windows = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = plain(windows).logits, model(windows).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    # this random model amplifies errors (0.04-0.06 relative at 8 bits, 0.4-0.55 at 4 bits, measured)
    assert (a - b).norm() / a.norm() < (0.1 if "8" in method else 0.8)


@pytest.mark.parametrize("method", ["rtn_int8", "rtn_int4", "palettization_4bit", "qlora_nf4"])
def test_uncalibrated_heads_are_the_methods_from_float(base, method):
    model, _ = quantized(base, method, None, head=True)
    ref = qtutor.get_method(method).from_float(base.lm_head, config(method))
    assert torch.equal(model.lm_head.dequantize(), ref.dequantize())


@pytest.mark.parametrize("method", ["rtn_int4", "palettization_4bit", "qlora_nf4", "smoothquant_w8a8"])
def test_rows_read_from_the_packing_equal_the_whole_weight(base, calib, method):
    model, _ = quantized(base, method, calib, head=True)
    head = model.lm_head
    rows = torch.tensor([5, 0, 127, 5, 64])
    assert torch.equal(head.dequantize_rows(rows), QuantizedLinear.dequantize_rows(head, rows))


def test_nf4_rows_when_blocks_straddle_rows():
    from qtutor.quant.nf4 import NF4Config, NF4Linear

    linear = torch.nn.Linear(40, 9)  # 360 weights in blocks of 64: blocks cross row boundaries
    q = NF4Linear.from_float(linear, NF4Config())
    rows = torch.arange(9).flip(0)
    assert torch.equal(q.dequantize_rows(rows), q.dequantize()[rows])


def test_gptq_head_is_calibrated_on_the_final_norm_outputs(base, calib, monkeypatch):
    from qtutor.quant import gptq

    seen = {}

    def spy(linear, X, cfg):
        seen["X"] = X.clone()
        return gptq.quantize_head(linear, X, cfg)

    monkeypatch.setitem(REGISTRY, "gptq_int4", dataclasses.replace(REGISTRY["gptq_int4"], quantize_head=spy))
    plain, _ = quantized(base, "gptq_int4", calib, head=False)
    model, _ = quantized(base, "gptq_int4", calib, head=True)
    with torch.no_grad():  # the quantized decoder's last hidden states: the final norm's outputs
        expected = plain.model(calib, use_cache=False).last_hidden_state
    torch.testing.assert_close(seen["X"], expected, rtol=1e-5, atol=1e-5)

    # on those inputs GPTQ's head has a smaller output error than round-to-nearest on its grid
    X = expected.reshape(-1, expected.shape[-1])
    W = base.lm_head.weight.detach()
    rtn = qtutor.get_method("rtn_int4").from_float(base.lm_head, qtutor.RTNConfig(4, 32))
    err_gptq = (X @ (model.lm_head.dequantize() - W).T).norm()
    err_rtn = (X @ (rtn.dequantize() - W).T).norm()
    assert err_gptq < err_rtn


def test_awq_head_has_no_scale_only_clipping(base, calib):
    from qtutor.quant.rtn import UniformLinear

    cfg = qtutor.AWQConfig(group_size=32, clip=False)
    model = copy.deepcopy(base)
    qtutor.quantize(model, "awq_int4", cfg, calib=calib, head=True)
    ref = UniformLinear.from_float(base.lm_head, cfg.rtn())  # no clipping: plain RTN, no scale
    assert torch.equal(model.lm_head.dequantize(), ref.dequantize())
    clipped = copy.deepcopy(base)
    qtutor.quantize(clipped, "awq_int4", cfg.replace(clip=True), calib=calib, head=True)
    W = base.lm_head.weight.detach()
    assert clipped.lm_head.dequantize().abs().max() <= W.abs().max() * 1.01  # clipping only shrinks


def test_smoothquant_head_is_w8a8_without_smoothing(base, calib):
    from qtutor.quant.smoothquant import W8A8Linear

    model, _ = quantized(base, "smoothquant_w8a8", calib, head=True)
    ref = W8A8Linear.from_float(base.lm_head, config("smoothquant_w8a8"))
    assert torch.equal(model.lm_head.qweight, ref.qweight)
    assert torch.equal(model.lm_head.weight_scales, ref.weight_scales)


def test_the_lookup_follows_the_models_dtype(base):
    model, _ = quantized(base, "rtn_int4", None, head=True)
    ids = torch.tensor([[1, 2, 3]])
    ref = model.get_input_embeddings()(ids)
    model.half()  # fp16 scales and uint8 codes stay as they are: the same rows, in fp16
    assert model.get_input_embeddings()(ids).dtype == torch.float16
    assert torch.equal(model.get_input_embeddings()(ids), ref.half())


def test_an_untied_head_is_quantized_and_the_embedding_kept():
    base = tiny_model("llama", tie_word_embeddings=False)
    model = copy.deepcopy(base)
    report = qtutor.quantize(model, "rtn_int4", qtutor.RTNConfig(4, 32), head=True)
    assert not report.layers["lm_head"]["tied"]
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    table = base.get_input_embeddings().weight
    assert memory_report(model).embeddings_bytes == table.numel() * table.element_size() + model.lm_head.nbytes


def test_bad_head_requests_are_one_line_errors(base):
    with pytest.raises(QtutorError, match="fp16_baseline is the unquantized reference") as e:
        qtutor.quantize(copy.deepcopy(base), "fp16_baseline", head=True)
    assert "\n" not in str(e.value)
    with pytest.raises(QtutorError, match="head must be True or False"):
        qtutor.quantize(copy.deepcopy(base), "rtn_int4", head="yes")
    model = copy.deepcopy(base)
    qtutor.quantize(model, "rtn_int4", qtutor.RTNConfig(4, 32), head=True)
    with pytest.raises(QtutorError, match="already quantized"):
        qtutor.quantize(model, "rtn_int4", head=True)


@pytest.mark.parametrize(
    "method, kernel",
    [
        ("rtn_int8", "aten._weight_int8pack_mm"),
        ("rtn_int4", "aten._weight_int4pack_mm_for_cpu"),
        ("palettization_4bit", "cpu palette_gemv (C)"),
        ("qlora_nf4", "cpu nf4_gemv (C)"),
    ],
)
def test_the_cpu_kernels_serve_the_head_and_the_decoders_agree(base, method, kernel):
    model, _ = quantized(base, method, None, head=True)
    before = model.lm_head.dequantize().float()
    done = kernels.accelerate(model, "cpu")
    if "lm_head" not in done["converted"]:
        pytest.skip(f"no CPU kernel here: {done['skipped'].get('lm_head')}")
    assert done["converted"]["lm_head"] == kernel
    head, emb = model.lm_head, model.get_input_embeddings()
    assert emb.head is head  # the re-stored head still serves the lookup: one copy
    rows = torch.tensor([3, 64, 127])
    torch.testing.assert_close(emb(rows), before[rows], rtol=1e-2, atol=1e-2 * before.abs().max().item())
    prompt = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(1))
    ref, _, _ = greedy_decode(model, prompt, 12)
    assert head.last_kernel == kernel
    out, _, _ = StaticDecoder(model, 24).generate(prompt, 12)
    assert torch.equal(out, ref)


@pytest.mark.skipif(not kernels.tinygemm_available("cpu"), reason="no _weight_int4pack_mm_for_cpu")
def test_a_layout_without_row_reads_leaves_the_embedding_its_packed_rows(base, monkeypatch):
    model, _ = quantized(base, "rtn_int4", None, head=True)
    old = model.lm_head
    monkeypatch.setattr(kernels.Int4TinyGemmLinear, "_rows_readable", lambda self, layer: False)
    kernels.accelerate(model, "cpu")
    assert isinstance(model.lm_head, kernels.Int4TinyGemmLinear)
    assert model.get_input_embeddings().head is old  # kept for the lookups, and counted
    assert memory_report(model).embeddings_bytes == old.nbytes + model.lm_head.nbytes
    again = kernels.accelerate(model, "cpu")  # the lookup-only copy is not converted again
    assert not any(name.startswith("model.embed_tokens") for name in again["converted"])
    assert model.get_input_embeddings().head is old


@pytest.mark.skipif(not kernels.tinygemm_available("cpu"), reason="no _weight_int4pack_mm_for_cpu")
@pytest.mark.parametrize("out_features", [64, 192])
def test_tinygemm_cpu_rows_are_read_from_its_layout(out_features):
    from qtutor.quant.rtn import RTNConfig, UniformLinear

    lin = torch.nn.Linear(128, out_features, bias=False)
    q = UniformLinear.from_float(lin, RTNConfig(4, 32))
    t = kernels.Int4TinyGemmLinear.from_uniform(q)
    assert t.gathers_rows
    rows = torch.randperm(out_features, generator=torch.Generator().manual_seed(0))
    ref = q.dequantize()[rows]
    torch.testing.assert_close(t.dequantize_rows(rows), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


def test_perplexity_of_an_int8_head_on_qtutor_tiny():
    from qtutor.data import dataset_text, tokenize
    from qtutor.eval import perplexity

    model, tok = qtutor.load_model("qtutor-tiny")
    ids = tokenize(tok, dataset_text("embedded", "eval"))
    ppl = {}
    for head in (False, True):
        m = copy.deepcopy(model)
        qtutor.quantize(m, "rtn_int8", head=head)
        ppl[head] = perplexity(m, ids, 512, max_tokens=8 * 512, batch_size=4).ppl
    assert all(torch.isfinite(torch.tensor(p)) for p in ppl.values())
    assert ppl[True] != ppl[False]  # the head did change
    assert abs(ppl[True] / ppl[False] - 1) < 0.01  # an 8-bit per-channel head costs under 1%


@pytest.mark.skipif(
    not kernels.triton_available() or torch.cuda.is_available(),
    reason="Triton interpreter tests run on CPU-only machines (tests/test_kernels.py says why)",
)
@pytest.mark.parametrize(
    "method, kernel",
    [("rtn_int4", "triton int4_gemv"), ("palettization_4bit", "triton lut_gemv (prmt)"), ("qlora_nf4", None)],
)
def test_the_triton_kernels_serve_the_head_in_place(base, method, kernel):
    """On a GPU a kernel is mixed into the head's own class: the one module stays the lm_head and
    the embedding's row source (run here in Triton's interpreter)."""
    model, _ = quantized(base, method, None, head=True)
    head = model.lm_head
    x = torch.randn(1, 1, head.in_features, generator=torch.Generator().manual_seed(4))
    ref = head(x)
    done = kernels.accelerate(model, "triton", kernel_on_cpu=True)
    assert model.lm_head is head and model.get_input_embeddings().head is head
    assert done["converted"]["lm_head"] == (kernel or kernels._TritonNF4.kernel_name)
    torch.testing.assert_close(head(x), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert head.last_kernel.startswith("triton")  # the kernel ran, not the reference forward
    rows = torch.tensor([0, 100])
    assert torch.equal(model.get_input_embeddings()(rows), head.dequantize_rows(rows))
