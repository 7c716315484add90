"""Core ML export: our LUTs, scales and indices end up in the saved .mlpackage."""
import logging
import math
import sys

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
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj",
                 "layers.1.self_attn.v_proj"):
        ours = model.model.get_submodule(name)
        assert isinstance(ours, PalettizedLinear)
        entry = coreml.find_lut(luts, "model." + name)
        lut = torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16))
        # coremltools folds the per-channel scale into the table: one table row per output
        # channel, each LUT group's values repeated for its 16 rows
        assert lut.shape == (ours.out_features, 16)
        assert torch.equal(lut, ours.unpacked().row_luts())
        assert torch.equal(torch.from_numpy(entry["scale"].astype(np.float16)), ours.scales)
        assert torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)),
                           ours.unpacked().indices.long())


def test_luts_without_scales_are_stored_as_is(tmp_path):
    model = tiny_model("qwen2", num_hidden_layers=1)
    qtutor.quantize(model, "palettization_4bit",
                    qtutor.PalettizeConfig(per_channel_scale=False, group_size=32))
    luts = coreml.read_luts(coreml.export_mlpackage(model, tmp_path / "m.mlpackage", seqlen=4))
    assert len(luts) == 7
    ours = model.model.layers[0].mlp.up_proj
    entry = coreml.find_lut(luts, "model.layers.0.mlp.up_proj")
    assert entry["scale"] is None
    assert torch.equal(torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16)), ours.lut)
    assert torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)),
                       ours.unpacked().indices.long())


def row_luts(entry, out_features):
    """The table each row uses in a read_luts entry: n tables of out_features // n rows each."""
    lut = torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16))
    assert out_features % lut.shape[0] == 0
    return lut.repeat_interleave(out_features // lut.shape[0], dim=0)


@pytest.mark.parametrize("out,rows", [(172, 16), (44, 16), (20, 8), (32, 16), (12, 12)])
def test_coreml_lut_has_equal_groups_and_decodes_the_same(out, rows):
    g = torch.Generator().manual_seed(out)
    n_luts = -(-out // rows)
    q = qtutor.quant.palettize.LUTWeight(torch.randint(0, 16, (out, 8), generator=g, dtype=torch.uint8),
                                         torch.randn(n_luts, 16, generator=g).half(), None, 4, rows)
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
        assert torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)),
                           ours.unpacked().indices.long())
        if scale:
            assert torch.equal(torch.from_numpy(entry["scale"].astype(np.float16)), ours.scales)
        else:
            assert entry["scale"] is None
            assert torch.equal(torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16)),
                               coreml.coreml_lut(ours))
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
    wrapper = coreml.CausalLMForCoreML(coreml.prepare_for_export(model), SEQLEN)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids), model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS message")
def test_predict_needs_macos(exported):
    with pytest.raises(QtutorError, match="macOS"):
        coreml.predict(exported[1], torch.zeros(1, SEQLEN, dtype=torch.long))


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction runs only on macOS")
def test_predict_matches_torch_on_macos(exported):  # pragma: no cover - macOS only
    model, path, _ = exported
    ids = torch.randint(0, 128, (1, SEQLEN))
    logits = coreml.predict(path, ids)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
