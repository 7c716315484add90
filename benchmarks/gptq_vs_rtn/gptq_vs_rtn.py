"""Where GPTQ's smaller layer error does and does not buy perplexity: stories260K on WikiText-2.

GPTQ minimises each linear's output error ``||X W^T - X Q^T||^2`` on calibration tokens. This
script measures, on a real trained model (``stories260K-qwen2-hf``, widths 64 and 172, 4-bit,
one asymmetric scale per output channel):

1. ``layer``: for every linear of every layer, the output error of GPTQ relative to RTN on the
   same inputs (float model, calibration windows): below 1 means GPTQ did its job;
2. ``ablation``: perplexity when ONE kind of linear (in all layers) is quantized and the rest stay
   float, for RTN, GPTQ with H from the calibration windows, GPTQ with H from the evaluation
   tokens themselves ("oracle": no calibration mismatch is possible), and GPTQ with act-order.

    python benchmarks/gptq_vs_rtn/gptq_vs_rtn.py \\
        --model PATH/stories260K-qwen2-hf --data-dir PATH/hf-wikitext
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import environment, print_env, write_csv  # noqa: E402

from qtutor.calib import record_inputs  # noqa: E402
from qtutor.data import calibration_windows, eval_windows, tokenize, wikitext2_text  # noqa: E402
from qtutor.eval import perplexity  # noqa: E402
from qtutor.models import layout_for, load_model  # noqa: E402
from qtutor.quant.gptq import GPTQConfig, Hessian, gptq  # noqa: E402
from qtutor.quant.rtn import RTNConfig, quantize_weight  # noqa: E402

KINDS = {
    "q/k": ("self_attn.q_proj", "self_attn.k_proj"),
    "v": ("self_attn.v_proj",),
    "o": ("self_attn.o_proj",),
    "gate/up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@torch.no_grad()
def hessians(model, layout, windows, names) -> dict:
    """H = 2 X^T X / N of every linear named in ``names`` (all layers), from the float model."""
    mods = {f"{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(layout.layers(model)) for n in names}
    H = {k: Hessian(m.in_features) for k, m in mods.items()}
    with record_inputs(mods, lambda k, x: H[k].add_batch(x)):
        for i in range(0, len(windows), 8):
            model(windows[i : i + 8])
    return {k: h.H for k, h in H.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the stories260K Qwen2 folder")
    p.add_argument("--data-dir", required=True, help="WikiText-2 in the Hugging Face layout")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=200 * 512)
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    args = p.parse_args()
    torch.manual_seed(0)
    print_env(environment(torch.device("cpu")))
    model, tok = load_model(args.model)
    layout = layout_for(model)
    calib = calibration_windows(
        tokenize(tok, wikitext2_text("validation", args.data_dir)), args.calib_samples, args.seqlen
    )
    test = tokenize(tok, wikitext2_text("test", args.data_dir))[: args.eval_tokens]
    rtn_cfg, gptq_cfg = (
        RTNConfig(bits=4, group_size=0, sym=False),
        GPTQConfig(group_size=0, act_order=False, static_groups=False),
    )
    ppl = lambda: perplexity(model, test, args.seqlen).ppl  # noqa: E731
    fp = ppl()
    print(
        f"float perplexity {fp:.3f} on {len(test)} test tokens; calibration "
        f"{args.calib_samples} x {args.seqlen} validation tokens"
    )
    rows = []
    print("\n1. layer output error, GPTQ / RTN (same inputs, float model)")
    names = [n for kind in KINDS.values() for n in kind]
    Hc = hessians(model, layout, calib, names)
    for k, H in Hc.items():
        W = model.model.layers[int(k.split(".")[0])].get_submodule(k.split(".", 1)[1]).weight.detach().float()
        err = lambda Q: float(torch.einsum("ij,jk,ik->", W - Q, H, W - Q))  # noqa: E731
        ratio = err(gptq(W, H, gptq_cfg).Q) / err(quantize_weight(W, rtn_cfg).dequantize())
        rows.append({"part": "layer", "linear": k, "gptq_over_rtn_error": round(ratio, 4)})
        print(f"  {k:24s} {ratio:.3f}")
    print("\n2. perplexity with one kind of linear quantized (the rest float)")
    Ho = hessians(model, layout, eval_windows(test, args.seqlen), names)
    variants = {
        "rtn": None,
        "gptq (H: calibration)": (Hc, gptq_cfg),
        "gptq (H: the test tokens)": (Ho, gptq_cfg),
        "gptq act-order (H: calibration)": (Hc, gptq_cfg.replace(act_order=True)),
    }
    print(f"  {'linears':8s}" + "".join(f"{v:>34s}" for v in variants))
    for kind, kind_names in KINDS.items():
        row = {"part": "ablation", "linear": kind, "float": round(fp, 3)}
        for tag, spec in variants.items():
            saved = {}
            for i, layer in enumerate(layout.layers(model)):
                for n in kind_names:
                    lin = layer.get_submodule(n)
                    saved[lin] = lin.weight.data.clone()
                    W = lin.weight.data.float()
                    Q = (
                        quantize_weight(W, rtn_cfg).dequantize()
                        if spec is None
                        else gptq(W, spec[0][f"{i}.{n}"], spec[1]).Q
                    )
                    lin.weight.data.copy_(Q)
            row[tag] = round(ppl(), 3)
            for lin, W in saved.items():
                lin.weight.data.copy_(W)
        rows.append(row)
        print(f"  {kind:8s}" + "".join(f"{row[v]:>34.3f}" for v in variants))
    write_csv(rows, Path(args.out))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
