"""Core ML export: our LUTs, scales and indices end up in the saved .mlpackage (stateless and
with a stateful KV cache); prediction is macOS-only and tested there."""

import copy
import logging
import math
import sys
import time

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

import qtutor  # noqa: E402
from qtutor import QtutorError, coreml  # noqa: E402
from qtutor.quant.palettize import PalettizedLinear  # noqa: E402

from conftest import tiny_model  # noqa: E402

SEQLEN = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    logging.getLogger("coremltools").setLevel(logging.WARNING)
    model = tiny_model("qwen2")
    qtutor.quantize(model, "palettization_4bit")
    path = tmp_path_factory.mktemp("coreml") / "tiny.mlpackage"
    mlmodel = coreml.export_mlpackage(model, path, seqlen=SEQLEN)
    return model, path, mlmodel


def test_package_holds_our_luts_scales_and_indices(exported):
    model, path, _ = exported
    assert path.is_dir()
    luts = coreml.read_luts(path)  # read back from disk, no prediction needed
    assert len(luts) == 14  # every linear of both decoder layers is a constexpr_lut_to_dense
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.v_proj"):
        ours = model.model.get_submodule(name)
        assert isinstance(ours, PalettizedLinear)
        entry = coreml.find_lut(luts, "model." + name)
        lut = torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16))
        # coremltools folds the per-channel scale into the table: one table row per output
        # channel, each LUT group's values repeated for its 16 rows
        assert lut.shape == (ours.out_features, 16)
        assert torch.equal(lut, ours.unpacked().row_luts())
        assert torch.equal(torch.from_numpy(entry["scale"].astype(np.float16)), ours.scales)
        assert torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)), ours.unpacked().indices.long())


def test_luts_without_scales_are_stored_as_is(tmp_path):
    model = tiny_model("qwen2", num_hidden_layers=1)
    qtutor.quantize(model, "palettization_4bit", qtutor.PalettizeConfig(per_channel_scale=False, group_size=32))
    luts = coreml.read_luts(coreml.export_mlpackage(model, tmp_path / "m.mlpackage", seqlen=4))
    assert len(luts) == 7
    ours = model.model.layers[0].mlp.up_proj
    entry = coreml.find_lut(luts, "model.layers.0.mlp.up_proj")
    assert entry["scale"] is None
    assert torch.equal(torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16)), ours.lut)
    assert torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)), ours.unpacked().indices.long())


def row_luts(entry, out_features):
    """The table each row uses in a read_luts entry: n tables of out_features // n rows each."""
    lut = torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16))
    assert out_features % lut.shape[0] == 0
    return lut.repeat_interleave(out_features // lut.shape[0], dim=0)


@pytest.mark.parametrize("out,rows", [(172, 16), (44, 16), (20, 8), (32, 16), (12, 12)])
def test_coreml_lut_has_equal_groups_and_decodes_the_same(out, rows):
    g = torch.Generator().manual_seed(out)
    n_luts = -(-out // rows)
    q = qtutor.quant.palettize.LUTWeight(
        torch.randint(0, 16, (out, 8), generator=g, dtype=torch.uint8),
        torch.randn(n_luts, 16, generator=g).half(),
        None,
        4,
        rows,
    )
    table = coreml.coreml_lut(PalettizedLinear(q))
    assert out % table.shape[0] == 0  # equal groups, as coremltools' LUT buffer needs
    if out % rows == 0:
        assert torch.equal(table, q.lut)
    else:
        assert table.shape[0] == out // math.gcd(rows, out)  # 172, 16: 43 tables of 4 rows
    assert torch.equal(table.repeat_interleave(out // table.shape[0], dim=0), q.row_luts())


@pytest.mark.parametrize("scale", [True, False])
def test_export_with_a_shorter_last_group(tmp_path, scale):
    # intermediate 44 = 2 x 16 + 12: gate/up have 3 LUTs, the last for 12 rows (coremltools'
    # own palettizer would skip these layers)
    model = tiny_model("qwen2", num_hidden_layers=1, intermediate_size=44)
    qtutor.quantize(model, "palettization_4bit", qtutor.PalettizeConfig(per_channel_scale=scale))
    luts = coreml.read_luts(coreml.export_mlpackage(model, tmp_path / "m.mlpackage", seqlen=4))
    assert len(luts) == 7
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"):
        ours = model.model.layers[0].get_submodule(name)
        assert ours.rows_per_lut == 16
        assert ours.lut.shape[0] == -(-ours.out_features // 16)
        entry = coreml.find_lut(luts, "model.layers.0." + name)
        assert torch.equal(row_luts(entry, ours.out_features), ours.unpacked().row_luts())
        assert torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)), ours.unpacked().indices.long())
        if scale:
            assert torch.equal(torch.from_numpy(entry["scale"].astype(np.float16)), ours.scales)
        else:
            assert entry["scale"] is None
            assert torch.equal(torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16)), coreml.coreml_lut(ours))
        # every LUT of ours, the short last one included, is in the package
        stored = {tuple(r.tolist()) for r in torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16))}
        assert all(tuple(r.tolist()) in stored for r in ours.lut)


def test_export_rejects_a_bad_path(tmp_path):
    with pytest.raises(QtutorError, match="mlpackage"):
        coreml.export_mlpackage(tiny_model("qwen2"), tmp_path / "model.mlmodel")


def test_wrapper_matches_the_model():
    model = tiny_model("llama")
    qtutor.quantize(model, "palettization_4bit")
    ids = torch.randint(0, 128, (1, SEQLEN))
    with torch.no_grad():
        ref = model(ids).logits
        exact = coreml.CausalLMForCoreML(coreml.prepare_for_export(model, table_dtype=torch.float32), SEQLEN)
        torch.testing.assert_close(exact(ids), ref, rtol=1e-4, atol=1e-4)
        # the default copy keeps the embedding table / lm_head in float16, as the package stores it
        half = coreml.CausalLMForCoreML(coreml.prepare_for_export(model), SEQLEN)
        torch.testing.assert_close(half(ids), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_prepare_for_export_copies_an_fp16_model_to_float32_on_the_cpu():
    model = tiny_model("qwen2")
    qtutor.quantize(model, "palettization_4bit")
    model.half()  # as chapter 7 holds it on a GPU (no GPU here: the dtype is what changes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = coreml.prepare_for_export(model)
    emb, head = copy.get_input_embeddings(), copy.get_output_embeddings()
    assert emb.weight.dtype == torch.float16 and head.weight is emb.weight  # still tied
    q_proj = copy.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    assert torch.equal(q_proj.weight, model.model.layers[0].self_attn.q_proj.dequantize().float())
    assert all(p.device.type == "cpu" for p in copy.parameters())
    assert copy.model.norm.weight.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unchanged
    assert isinstance(model.model.layers[0].self_attn.q_proj, PalettizedLinear)


def test_an_untied_lm_head_is_exported_in_float16_and_matches():
    model = tiny_model("llama", tie_word_embeddings=False)
    qtutor.quantize(model, "palettization_4bit")
    copy_ = coreml.prepare_for_export(model)
    head = copy_.get_output_embeddings()
    assert isinstance(head, coreml.HalfPrecisionHead) and head.weight.dtype == torch.float16
    assert head.weight is not copy_.get_input_embeddings().weight
    assert torch.equal(head.weight, model.lm_head.weight.half())
    ids = torch.randint(0, 128, (1, SEQLEN))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(
            coreml.CausalLMForCoreML(copy_, SEQLEN)(ids), ref, rtol=0, atol=2e-2 * ref.abs().max().item()
        )


def test_a_quantized_tied_head_is_exported_once_with_our_palettes(tmp_path):
    """qtutor.quantize(..., head=True): the copy's embedding reads the rows of the head's
    annotated linear (same logits), and the package holds the head's palettes, once."""
    logging.getLogger("coremltools").setLevel(logging.WARNING)
    model = tiny_model("qwen2")
    qtutor.quantize(model, "palettization_4bit", head=True)
    copy_ = coreml.prepare_for_export(model)
    assert copy_.get_input_embeddings().head is copy_.get_output_embeddings()
    ids = torch.randint(0, 128, (1, SEQLEN))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(coreml.CausalLMForCoreML(copy_, SEQLEN)(ids), ref, rtol=0, atol=1e-5)
    path = tmp_path / "head.mlpackage"
    coreml.export_mlpackage(model, path, seqlen=SEQLEN)
    assert len(coreml.read_luts(path)) == 15  # the 14 decoder linears and the head
    check = coreml.check_package(path, model)
    assert check.ok, str(check)


def test_check_package_compares_every_layer_and_finds_a_changed_one(exported):
    model, path, _ = exported
    assert coreml.states_of(path) == {}  # the stateless export
    check = coreml.check_package(path, model)
    assert check.ok and check.layers == check.stored == 14
    assert all(bad == [] for bad in check.mismatches.values())
    changed = copy.deepcopy(model)
    layer = changed.model.layers[1].mlp.down_proj
    layer.lut[0, 3] += 0.5
    layer.scales[5] *= 2
    check = coreml.check_package(path, changed)
    assert not check.ok
    assert check.mismatches == {
        "palettes": ["model.layers.1.mlp.down_proj"],
        "scales": ["model.layers.1.mlp.down_proj"],
        "indices": [],
    }


def test_peak_host_memory_sees_an_allocation():
    with coreml.PeakHostMemory(interval=0.005) as m:
        block = np.ones(256 * 2**20, dtype=np.uint8)  # 256 MiB, touched
        time.sleep(0.05)
        del block
    assert m.extra >= 200 * 2**20, str(m)
    assert m.peak >= m.start > 0 and m.seconds >= 0.05


def test_causal_mask_lets_each_token_see_the_past_and_itself():
    mask = coreml.causal_mask(3, 2)
    assert mask.shape == (1, 1, 2, 5) and mask.dtype == np.float16
    assert (mask[0, 0] == 0).tolist() == [[True] * 4 + [False], [True] * 5]
    assert (coreml.causal_mask(0, 3)[0, 0] < 0).tolist() == [
        [False, True, True],
        [False, False, True],
        [False, False, False],
    ]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_stateful_wrapper_decodes_token_by_token_like_the_model(family):
    model = tiny_model(family)
    qtutor.quantize(model, "palettization_4bit")
    # a float32 cache and tables: the same arithmetic as the model, so the logits agree closely
    wrapper = coreml.StatefulCausalLMForCoreML(
        coreml.prepare_for_export(model, table_dtype=torch.float32), max_len=16, cache_dtype=torch.float32
    )
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        steps = [wrapper(ids[:, :6], torch.from_numpy(coreml.causal_mask(0, 6)))]  # the prompt
        for t in range(6, 10):  # then one token each
            steps.append(wrapper(ids[:, t : t + 1], torch.from_numpy(coreml.causal_mask(t, 1))))
    assert all(s.shape == (1, 1, 128) for s in steps)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, 5:], rtol=1e-4, atol=1e-4)
    assert wrapper.k_cache[:, :, :, 10:].abs().sum() == 0  # nothing written past the last token
    assert wrapper.k_cache[:, :, :, :10].abs().sum() > 0


def test_stateful_export_has_states_and_our_palettes(tmp_path):
    model = tiny_model("qwen2")
    qtutor.quantize(model, "palettization_4bit")
    path = tmp_path / "kv.mlpackage"
    mlmodel = coreml.export_stateful_mlpackage(model, path, max_len=16)
    cfg = model.config
    cache = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 16, cfg.hidden_size // cfg.num_attention_heads)
    assert coreml.states_of(path) == {"k_cache": cache, "v_cache": cache}
    ops = coreml.op_types(path)
    assert ops["constexpr_lut_to_dense"] == 14  # every linear stays palettized
    assert ops["read_state"] >= 2 and ops["coreml_update_state"] >= 2 * cfg.num_hidden_layers
    check = coreml.check_package(path, model)
    assert check.ok and check.ops == ops  # the check counts the operations from the same read
    inputs = {i.name: i for i in mlmodel.get_spec().description.input}
    ranges = [(r.lowerBound, r.upperBound) for r in inputs["causal_mask"].type.multiArrayType.shapeRange.sizeRanges]
    assert ranges == [(1, 1), (1, 1), (1, 16), (1, 16)]  # any prompt length, then one token at a time


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS message")
def test_predict_and_generate_need_macos(exported):
    with pytest.raises(QtutorError, match="macOS"):
        coreml.predict(exported[1], torch.zeros(1, SEQLEN, dtype=torch.long))
    with pytest.raises(QtutorError, match="macOS"):
        coreml.generate(exported[1], torch.zeros(1, 4, dtype=torch.long), 2)


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction runs only on macOS")
def test_predict_matches_torch_on_macos(exported):  # pragma: no cover - macOS only
    model, path, _ = exported
    ids = torch.randint(0, 128, (1, SEQLEN))
    logits = coreml.predict(path, ids)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()


def _lut_case(out, in_, bits, n_luts, seed):
    """A weight decoded from random sorted LUTs (some with repeated entries), divided by a
    scale as coremltools' frontend does, plus values exactly half-way between two entries."""
    rng = np.random.default_rng(seed)
    K = 2**bits
    lut = np.sort(rng.standard_normal((n_luts, 1, K, 1)), axis=2).astype(np.float32)
    lut[0, 0, 1] = lut[0, 0, 0]  # a LUT with a repeated entry
    lut[-1, 0, :, 0] = lut[-1, 0, 0, 0]  # and one whose entries are all equal
    index = rng.integers(0, K, (out, in_))
    W = np.take_along_axis(np.repeat(lut[:, 0, :, 0], out // n_luts, axis=0), index, axis=1)
    scale = (rng.random((out, 1)) + 0.5).astype(np.float32)
    data = (W * scale) / scale
    rows = np.repeat(lut[:, 0, :, 0], out // n_luts, axis=0)
    data[:, 0] = (rows[:, 0] + rows[:, 1]) / 2  # ties: the lower index wins in argmin
    data[:, 1] = rows[:, -1] + 1.0  # beyond the last entry
    return data.astype(np.float32), lut


@pytest.mark.parametrize("out,in_,bits,n_luts", [(64, 48, 4, 4), (96, 40, 2, 96), (32, 24, 8, 1), (48, 16, 3, 3)])
def test_nearest_lut_indices_equal_coremltools_own(out, in_, bits, n_luts):
    from coremltools.optimize._utils import find_indices_for_lut

    data, lut = _lut_case(out, in_, bits, n_luts, seed=out + bits)
    theirs = find_indices_for_lut(data, lut)
    ours = coreml.nearest_lut_indices(data, lut)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs.astype(np.uint8))


def test_fast_lut_indices_is_scoped_and_hands_other_shapes_to_coremltools():
    from coremltools.optimize import _utils

    original = _utils.find_indices_for_lut
    data, lut = _lut_case(32, 16, 4, 2, seed=1)
    with coreml._fast_lut_indices():
        patched = _utils.find_indices_for_lut
        assert patched is not original
        got = patched(data, lut)
        assert got.dtype == original(data, lut).dtype
        np.testing.assert_array_equal(got, original(data, lut))
        vector = np.sort(np.random.default_rng(0).standard_normal((1, 1, 4, 2)), axis=2).astype(np.float32)
        np.testing.assert_array_equal(patched(data, vector, 0), original(data, vector, 0))  # vector LUTs: theirs
    assert _utils.find_indices_for_lut is original
    with pytest.raises(RuntimeError), coreml._fast_lut_indices():
        raise RuntimeError("a failed conversion")
    assert _utils.find_indices_for_lut is original


def test_known_indices_are_handed_over_when_they_decode_to_the_weight():
    """Indices from known_indices go to the package as they are (a repeated LUT entry may be
    picked at its second place, which the nearest-entry search never does); indices that do not
    decode to the converted weight (another layer's) are searched for instead."""
    from coremltools.optimize import _utils

    rng = np.random.default_rng(0)
    lut = np.sort(rng.standard_normal((2, 1, 16, 1)), axis=2).astype(np.float32)
    lut[:, 0, 1] = lut[:, 0, 0]  # entries 0 and 1 equal
    index = torch.from_numpy(rng.integers(0, 16, (8, 12))).to(torch.uint8)
    index[:, 0] = 1  # the second of the equal entries
    rows = np.repeat(lut[:, 0, :, 0], 4, axis=0)
    scale = (rng.random((8, 1)) + 0.5).astype(np.float32)
    data = ((np.take_along_axis(rows, index.long().numpy(), axis=1) * scale) / scale).astype(np.float32)
    with coreml._fast_lut_indices({coreml._lut_key(lut, data.shape): index}):
        got = _utils.find_indices_for_lut(data, lut)
    np.testing.assert_array_equal(got, index.numpy())
    assert (got[:, 0] == 1).all()
    wrong = torch.roll(index, 1, dims=1)
    with coreml._fast_lut_indices({coreml._lut_key(lut, data.shape): wrong}):
        got = _utils.find_indices_for_lut(data, lut)
    np.testing.assert_array_equal(got, coreml.nearest_lut_indices(data, lut))
    assert (got[:, 0] == 0).all()


def test_export_hands_over_every_known_index_without_a_search(tmp_path, monkeypatch):
    model = tiny_model("qwen2", num_hidden_layers=1)
    qtutor.quantize(model, "palettization_4bit")
    prepared = coreml.prepare_for_export(model)
    known = coreml.known_indices(prepared)
    assert len(known) == 7
    assert not any("qtutor_indices" in name for name in prepared.state_dict())  # not a buffer: not traced

    def searched(*args):
        raise AssertionError("the nearest-entry search ran")

    monkeypatch.setattr(coreml, "nearest_lut_indices", searched)
    path = tmp_path / "m.mlpackage"
    coreml.export_mlpackage(model, path, seqlen=4)
    assert coreml.check_package(path, model).ok


@pytest.mark.parametrize("side_by_side", [False, True])  # one child for both packages, or one child each
def test_exports_in_a_background_process_match_the_model(tmp_path, side_by_side):
    model = tiny_model("qwen2", num_hidden_layers=1)
    qtutor.quantize(model, "palettization_4bit")
    plain, kv = tmp_path / "m.mlpackage", tmp_path / "m-kv.mlpackage"
    job = coreml.export_in_background(
        model, plain=plain, stateful=kv, seqlen=4, max_len=16, threads=1, side_by_side=side_by_side
    )
    assert len(job.children) == (2 if side_by_side else 1)
    costs = job.result(timeout=600)
    assert job.done() and set(costs) == {"plain", "stateful"}
    assert all(c.seconds > 0 and c.peak > 0 and c.peak >= c.start for c in costs.values())
    assert "peak host memory" in str(costs["plain"])
    assert not job.model_file.exists()  # the temporary copy of the model is gone
    assert coreml.check_package(plain, model).ok and coreml.check_package(kv, model).ok
    assert set(coreml.states_of(kv)) == {"k_cache", "v_cache"}


def test_background_export_errors_are_one_line(tmp_path):
    with pytest.raises(QtutorError, match="saved as a .mlpackage"):
        coreml.export_in_background(tiny_model("qwen2", num_hidden_layers=1), plain=tmp_path / "m.zip")
    with pytest.raises(QtutorError, match="nothing to export"):
        coreml.export_in_background(tiny_model("qwen2", num_hidden_layers=1))
    for side_by_side in (False, True):
        job = coreml.export_in_background(  # not a causal LM
            torch.nn.Linear(4, 4),
            plain=tmp_path / "x.mlpackage",
            stateful=tmp_path / "y.mlpackage",
            side_by_side=side_by_side,
        )
        with pytest.raises(QtutorError, match="^Core ML export failed: .*its log: ") as err:
            job.result(timeout=600)
        assert "\n" not in str(err.value)


def test_coremltools_palettizer_beside_ours():
    """coremltools' palettizer through qtutor.coreml: its weight decodes from its palettes (one
    per 16 rows), the linear is untouched, and without per-channel scales its palettes are the
    ones kmeans="coreml" computes (what chapter 5 shows)."""
    from qtutor.quant.palettize import PalettizeConfig, kmeans_lut

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 32, bias=False)
    before = lin.weight.detach().clone()
    W_hat, lut = coreml.coremltools_palettize(lin)
    assert torch.equal(lin.weight, before) and W_hat.shape == (32, 40) and lut.shape == (2, 16)
    plain = PalettizeConfig(per_channel_scale=False)
    W_plain, lut_plain = coreml.coremltools_palettize(lin, plain)
    rows = lut_plain.repeat_interleave(16, dim=0)
    assert all(set(W_plain[r].tolist()) <= set(rows[r].tolist()) for r in range(32))
    ours = kmeans_lut(lin.weight.detach(), PalettizeConfig(per_channel_scale=False, kmeans="coreml"))
    assert torch.equal(lut_plain.half(), ours.lut)
