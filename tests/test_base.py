"""Packing and the shared layer/registry machinery."""

import pytest
import torch

import qtutor
from qtutor.quant.base import METHOD_NAMES, get_method, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 37, 128])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), generator=torch.Generator().manual_seed(bits * n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-n * bits // 8))  # real packing: ceil(n * bits / 8) bytes per row
    assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.uint8))


def test_four_bit_layout_low_nibble_first():
    assert pack_codes(torch.tensor([[1, 2, 15, 0]]), 4).tolist() == [[0x21, 0x0F]]


def test_three_bit_layout_known_answer():
    # 8 codes of 3 bits = 24 bits = 3 bytes, code i at bits [3i, 3i+3)
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 1]])
    assert pack_codes(codes, 3).tolist() == [[0x07, 0x00, 0x20]]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(qtutor.QtutorError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)


def test_registry_names_and_errors():
    assert get_method("rtn_int4").name == "rtn_int4"
    with pytest.raises(qtutor.QtutorError, match="unknown method 'rtn_int5'"):
        get_method("rtn_int5")
    assert set(qtutor.implemented_methods()) <= set(METHOD_NAMES)


@pytest.mark.parametrize(
    "method", ["rtn_int4", "gptq_int4", "awq_int4", "palettization_4bit", "qlora_nf4", "smoothquant_w8a8"]
)
def test_config_replace_refuses_unknown_fields(method):
    import dataclasses
    from qtutor import QtutorError
    from qtutor.quant import get_method

    cfg = get_method(method).default_config
    first = dataclasses.fields(cfg)[0].name
    assert cfg.replace(**{first: None}) == cfg  # None keeps the field
    with pytest.raises(QtutorError, match="has no field 'group_sise'"):
        cfg.replace(group_sise=64)
