"""Chapter 7's live decode-speed rows (qtutor.runtime.speed) on a CPU: every row runs with the
harness, compares with the baseline of its dtype and says which kernel ran."""

import copy

import torch

import qtutor
from qtutor.runtime.speed import compare_decode_speed, linear_bits
from qtutor.runtime.kernels import tinygemm_available
from qtutor.quant.palettize import PalettizedLinear

from conftest import tiny_model


def test_cpu_rows_time_every_path_against_its_baseline():
    # widths that tinygemm takes (group 128 dividing in_features, out_features multiples of 16)
    model = tiny_model("qwen2", hidden_size=128, intermediate_size=256)
    pal = copy.deepcopy(model)
    qtutor.quantize(pal, "palettization_4bit")
    prompt = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(0))
    rows = {r["row"]: r for r in compare_decode_speed(model, prompt, new_tokens=3, runs=1, palettized=pal)}
    assert list(rows) == [
        "fp32",
        "rtn_int4, reference",
        "rtn_int4, CPU kernel",
        "palettization_4bit, reference",
        "palettization_4bit, CPU kernel",
        "bf16",
        "rtn_int4 (bf16), tinygemm",
    ]
    assert all(r["status"] == "ok" and r["ms_per_token"] > 0 for r in rows.values()), rows
    assert rows["fp32"]["vs_baseline"] == 1.0 and rows["bf16"]["vs_baseline"] == 1.0
    assert rows["fp32"]["kernel"] == "torch matmul" and rows["fp32"]["bits_per_weight"] == 32
    ref = rows["rtn_int4, reference"]
    assert ref["kernel"] == "reference forward" and 4 < ref["bits_per_weight"] < 4.3
    assert ref["vs_baseline"] == ref["ms_per_token"] / rows["fp32"]["ms_per_token"]
    assert rows["rtn_int4 (bf16), tinygemm"]["baseline"] == "bf16"
    expected = "aten._weight_int4pack_mm_for_cpu" if tinygemm_available(torch.device("cpu")) else "reference forward"
    assert rows["rtn_int4 (bf16), tinygemm"]["kernel"] == expected
    assert rows["rtn_int4, CPU kernel"]["kernel"] == expected and rows["rtn_int4, CPU kernel"]["baseline"] == "fp32"
    from qtutor.runtime import cpu_lut

    lut_kernel = "cpu palette_gemv (C)" if cpu_lut.available() is None else "reference forward"
    assert rows["palettization_4bit, CPU kernel"]["kernel"] == lut_kernel
    # neither the model nor the palettized copy was changed
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert type(pal.model.layers[0].mlp.up_proj) is PalettizedLinear
    assert linear_bits(pal) == rows["palettization_4bit, reference"]["bits_per_weight"]


def test_a_failing_row_is_reported_and_the_others_still_run():
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (4,), generator=torch.Generator().manual_seed(1))
    rows = compare_decode_speed(model, prompt, new_tokens=2, runs=1, lut_method="no_such_method")
    status = {r["row"]: r["status"] for r in rows}
    assert status["no_such_method, reference"].startswith("failed: ")
    assert status["fp32"] == status["rtn_int4, reference"] == "ok"
