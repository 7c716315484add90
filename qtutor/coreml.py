"""Core ML export: a (small) Qwen2/Llama causal LM as an ML Program ``.mlpackage`` whose
palettized linears carry qtutor's own LUTs and indices (chapter on palettization).

How it works (coremltools 9):

1. The model is wrapped in a module that takes ``input_ids`` (1, seqlen) and calls the model with
   a FIXED additive causal mask (0 on and below the diagonal, -1e4 above; a 4-D float mask, which
   transformers passes through untouched), fixed position ids and ``use_cache=False``, with eager
   attention: transformers' own mask construction does not convert.
2. Every :class:`~qtutor.quant.palettize.PalettizedLinear` becomes an ``nn.Linear`` whose weight is
   its dequantized value, plus the compression metadata that coremltools'
   ``PostTrainingPalettizer`` would have registered (buffers ``_COREML_/weight/lut`` (n_luts, 1,
   2^b, 1), ``_COREML_/weight/palettization_scale`` (out, 1) and
   ``_COREML_/weight/compression_type`` = [2], palettization), filled with OUR LUTs and scales.
   The LUT buffer's shape says how many blocks each weight axis is cut into, so coremltools
   needs groups of equal size; a layer whose last group is shorter (``group_size`` not dividing
   ``out_features``) is exported with an exactly equivalent table of equal groups
   (:func:`coreml_lut`). Other quantized linears are exported as plain (dequantized) linears.
3. ``torch.jit.trace`` and ``ct.convert(..., convert_to="mlprogram",
   minimum_deployment_target=ct.target.iOS18)``. The torch frontend turns each annotated weight
   into ``constexpr_lut_to_dense(indices, lut)`` followed by ``constexpr_blockwise_shift_scale``
   (the per-channel scale); the indices it finds are those of ``weight / scale`` in our LUT,
   that is, ours, since our dequantized weight is exactly ``lut[index] * scale`` (up to the
   choice among equal entries, when a group has fewer than 2^b distinct values). coremltools'
   optimisation passes then fold the scale into the table: the saved program holds
   ``constexpr_lut_to_dense(indices, constexpr_blockwise_shift_scale(lut rows, scale))`` with
   our LUT repeated for each output channel of its group (see :func:`read_luts`).

:func:`read_luts` reads the LUTs back from a saved package (on any platform);
:func:`predict` runs the package and needs macOS (Core ML runs only there).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn

from .errors import QtutorError
from .quant.base import QuantizedLinear
from .quant.palettize import PalettizedLinear

MASK_VALUE = -1e4  # finite, so that fp16 arithmetic never meets inf - inf
PALETTIZATION = 2  # coremltools' CompressionType.PALETTIZATION


def _coremltools():
    try:
        import coremltools as ct
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise QtutorError("Core ML export needs coremltools: pip install 'qtutor[coreml]'") from err
    return ct


class CausalLMForCoreML(nn.Module):
    """``input_ids`` (1, seqlen) -> logits (1, seqlen, vocab), with a fixed causal mask."""

    def __init__(self, model: nn.Module, seqlen: int):
        super().__init__()
        self.model = model
        mask = torch.full((seqlen, seqlen), MASK_VALUE).triu(1)
        self.register_buffer("causal_mask", mask[None, None])
        self.register_buffer("position_ids", torch.arange(seqlen)[None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=self.causal_mask.to(self.model.dtype),
                         position_ids=self.position_ids, use_cache=False, return_dict=True)
        return out.logits


def coreml_lut(q: PalettizedLinear) -> torch.Tensor:
    """``q``'s LUTs as equal groups of rows, as coremltools' ``_COREML_/weight/lut`` needs them:
    (out // g, 2^b) with ``g = gcd(rows_per_lut, out)`` rows per table.

    With ``rows_per_lut`` dividing ``out`` this is ``q.lut`` itself. Otherwise (172 rows, LUTs of
    16 rows, the last of 12) each LUT is repeated ``rows_per_lut // g`` times and the list cut to
    ``out // g`` tables (g = 4: 43 tables): row ``r`` uses table ``r // g``, which is LUT
    ``r // rows_per_lut`` since ``g`` divides ``rows_per_lut``. The indices and the decoded
    weights are unchanged; the package stores ``rows_per_lut // g`` copies of each LUT.
    """
    g = math.gcd(q.rows_per_lut, q.out_features)
    return q.lut.repeat_interleave(q.rows_per_lut // g, dim=0)[: q.out_features // g]


def annotated_linear(q: QuantizedLinear, palettized: bool = True) -> nn.Linear:
    """An ``nn.Linear`` holding ``q``'s dequantized weight; for a :class:`PalettizedLinear` (and
    ``palettized``), also coremltools' palettization metadata holding our LUTs and scales."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize().float())
        if q.bias is not None:
            lin.bias.copy_(q.bias.float())
    if palettized and isinstance(q, PalettizedLinear):
        lut = coreml_lut(q).float()
        lin.register_buffer("_COREML_/weight/lut", lut[:, None, :, None].contiguous())
        if q.scales is not None:
            lin.register_buffer("_COREML_/weight/palettization_scale",
                                q.scales.float()[:, None].clone())
        lin.register_buffer("_COREML_/weight/compression_type", torch.tensor([PALETTIZATION]))
    return lin


def prepare_for_export(model: nn.Module, palettized: bool = True) -> nn.Module:
    """A float32 copy of ``model`` with eager attention and every quantized linear replaced by
    :func:`annotated_linear`."""
    model = copy.deepcopy(model).float().eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, m in swaps:
        model.set_submodule(name, annotated_linear(m, palettized))
    return model


def export_mlpackage(model: nn.Module, path: Union[str, Path], seqlen: int = 32,
                     palettized: bool = True, compute_precision: str = "float16"):
    """Convert a Qwen2/Llama causal LM to an ML Program at ``path`` (``.mlpackage``) and return
    the ``coremltools.models.MLModel``.

    palettized: keep the LUTs of :class:`PalettizedLinear` layers as ``constexpr_lut_to_dense``
    weights (``False`` stores every weight densely). Runs on Linux too (the model is not loaded
    for prediction there); ``seqlen`` is the fixed input length.
    """
    ct = _coremltools()
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise QtutorError(f"Core ML ML Programs are saved as a .mlpackage folder, "
                          f"not {path.name!r}")
    if compute_precision not in ("float16", "float32"):
        raise QtutorError(f"compute_precision must be 'float16' or 'float32', "
                          f"not {compute_precision!r}")
    wrapper = CausalLMForCoreML(prepare_for_export(model, palettized), seqlen).eval()
    example = torch.zeros(1, seqlen, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    precision = ct.precision.FLOAT16 if compute_precision == "float16" else ct.precision.FLOAT32
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="input_ids", shape=(1, seqlen), dtype=np.int32)],
        outputs=[ct.TensorType(name="logits")],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
        skip_model_load=sys.platform != "darwin",
    )
    mlmodel.save(str(path))
    return mlmodel


def _load_program(path_or_model):
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    mlmodel = path_or_model
    if not isinstance(mlmodel, ct.models.MLModel):
        mlmodel = ct.models.MLModel(str(path_or_model), skip_model_load=True)
    return _convert_model_spec_to_pymil_prog(mlmodel, mlmodel.get_spec().specificationVersion,
                                             milproto_load)


def read_luts(path_or_model) -> dict:
    """The palettized weights stored in an ML Program (a saved ``.mlpackage`` path or an
    ``MLModel``), read from its MIL program without loading it for prediction (any platform).

    Returns {op name: {"lut": (n, 2^b) array, "indices": (out, in) uint8 array, "scale": (out,)
    array or None}}. The op name embeds the torch parameter name with dots as underscores
    (``model_model_layers_0_self_attn_q_proj_weight...``, see :func:`find_lut`).

    coremltools folds a per-channel scale into the table: the stored program computes
    ``constexpr_lut_to_dense(indices, lut=constexpr_blockwise_shift_scale(data, scale))`` with one
    table row per output channel (each group's LUT repeated for its rows) and ``scale`` per row;
    "lut" is then ``data`` and "scale" is ``scale``. Without scales "lut" is the stored table,
    ``n`` equal groups of ``out // n`` rows (see :func:`coreml_lut`): row ``r`` uses
    ``lut[r // (out // n)]`` in either case.
    """
    prog = _load_program(path_or_model)
    found: dict = {}

    def visit(block):
        for op in block.operations:
            for b in op.blocks:
                visit(b)
            if op.op_type != "constexpr_lut_to_dense":
                continue
            lut_op, scale = op.lut.op, None
            if lut_op.op_type == "constexpr_blockwise_shift_scale":
                lut, scale = lut_op.data.val, lut_op.scale.val
            else:
                lut = op.lut.val
            found[op.name] = {
                "lut": np.asarray(lut).reshape(np.asarray(lut).shape[0], -1),
                "indices": np.asarray(op.indices.val),
                "scale": None if scale is None else np.asarray(scale).reshape(-1),
            }

    for f in prog.functions.values():
        visit(f)
    return found


def find_lut(luts: dict, module_name: str) -> dict:
    """The entry of :func:`read_luts` for the torch linear ``module_name`` of the exported model
    (e.g. ``"model.layers.0.self_attn.q_proj"``)."""
    key = "model_" + module_name.replace(".", "_") + "_weight"
    hits = [v for name, v in luts.items() if name.startswith(key)]
    if len(hits) != 1:
        raise QtutorError(f"{len(hits)} palettized weights in the package match {module_name!r}")
    return hits[0]


def predict(path_or_model, input_ids) -> np.ndarray:
    """Logits of the Core ML model for ``input_ids`` (1, seqlen). macOS only."""
    if sys.platform != "darwin":
        raise QtutorError(f"Core ML prediction runs only on macOS (this is {sys.platform}); "
                          f"the .mlpackage itself was built and can be copied to a Mac")
    ct = _coremltools()
    mlmodel = path_or_model
    if not isinstance(mlmodel, ct.models.MLModel):
        mlmodel = ct.models.MLModel(str(path_or_model))
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids,
                     dtype=np.int32)
    return mlmodel.predict({"input_ids": ids})["logits"]
