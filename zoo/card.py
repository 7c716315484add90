"""Measure the shipped ``qtutor-tiny`` and write its model card (``MODEL_CARD.md``).

    python -m zoo.card --corpus .carry/corpus

With ``--corpus`` (the folder ``python -m zoo.corpus`` wrote) it first draws the
calibration text ``calib.txt`` from the *training* documents only (whole documents, seeded),
so calibration never sees the held-out text. Every figure in the card is measured here, on the
shipped files, by this script: held-out perplexity (fp32 and fp16 weights), the unigram
baseline of the same tokenizer, RTN INT8/INT4 effects, and a greedy sample. Training figures
(device, wall time, steps) are read from ``train_log.json``, which the training script wrote.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
from pathlib import Path

import torch

CALIB_BYTES = 400_000


def write_calib(corpus: Path, out: Path, seed: int = 0) -> int:
    """Whole training documents, drawn with ``seed``, until ``CALIB_BYTES``: -> bytes written."""
    docs = [d for d in (corpus / "train.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    random.Random(seed).shuffle(docs)
    chosen, size = [], 0
    for d in docs:
        if size >= CALIB_BYTES:
            break
        chosen.append(d)
        size += len(d.encode()) + 2
    text = "\n\n".join(chosen) + "\n"
    out.write_text(text, encoding="utf-8")
    return len(text.encode())


def unigram_ppl(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity of add-one-smoothed unigram probabilities counted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[eval_ids].mean()))


def measure(seqlen: int = 512) -> dict:
    import qtutor
    from qtutor.data import dataset_text, tokenize
    from qtutor.eval import perplexity

    model, tok = qtutor.load_model("qtutor-tiny", dtype=torch.float32)
    ids = tokenize(tok, dataset_text("embedded", "eval"))
    res = {"eval_tokens_total": int(ids.numel()), "seqlen": seqlen}

    def ppl(m):
        r = perplexity(m, ids, seqlen, batch_size=8)
        res["eval_tokens"] = r.eval_tokens
        return r.ppl

    res["fp32"] = ppl(model)
    res["fp16"] = ppl(copy.deepcopy(model).half())
    for name, cfg in (
        ("rtn_int8_per_channel", qtutor.RTNConfig(8, 0, sym=True)),
        ("rtn_int4_per_channel", qtutor.RTNConfig(4, 0)),
        ("rtn_int4_g128", qtutor.RTNConfig(4, 128)),
    ):
        m = copy.deepcopy(model)
        qtutor.quantize(m, "rtn_int8" if "int8" in name else "rtn_int4", cfg)
        res[name] = ppl(m)
    calib_ids = tokenize(tok, dataset_text("embedded", "calib"))
    res["unigram"] = unigram_ppl(calib_ids, ids, model.config.vocab_size)
    res["unigram_counted_on"] = f"calib.txt ({calib_ids.numel()} training tokens)"
    prompt = tok("In the beginning", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=48, do_sample=False, pad_token_id=tok.eos_token_id)
    res["sample_prompt"] = "In the beginning"
    res["sample"] = tok.decode(out[0])
    res["parameters"] = sum(p.numel() for p in model.parameters())
    return res


def main(argv=None):
    from qtutor.models import embedded_model_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=None, help="corpus folder: (re)draw calib.txt from train.txt")
    args = p.parse_args(argv)
    d = embedded_model_dir()
    if args.corpus is not None:
        print(f"calib.txt: {write_calib(args.corpus, d / 'calib.txt')} bytes of training documents")
    res = measure()
    (d / "measurements.json").write_text(json.dumps(res, indent=1) + "\n")
    log = json.loads((d / "train_log.json").read_text())
    manifest = json.loads((d / "corpus_manifest.json").read_text())
    (d / "MODEL_CARD.md").write_text(render(res, log, manifest))
    print(json.dumps(res, indent=1))


def render(res: dict, log: dict, manifest: dict) -> str:
    env = log.get("environment", {})
    src_rows = "\n".join(
        f"| {s.get('title', s['name'])} | {', '.join(s.get('debian_packages', {}))} | {s.get('license')} | "
        f"{s['train']['documents']} / {s['heldout']['documents']} | {s['train']['bytes']:,} / {s['heldout']['bytes']:,} |"
        for s in manifest["sources"]
    )

    def rel(k):
        return 100 * (res[k] / res["fp16"] - 1)

    return f"""# qtutor-tiny

A small causal language model with the Qwen2 architecture, trained for this book so that every
chapter runs offline in seconds. It is **not** a useful language model: it exists so that the
quantization methods meet the same code path as on `Qwen/Qwen2-0.5B` (grouped-query attention,
q/k/v biases, tied embeddings, RMSNorm, SwiGLU, RoPE with theta 1e6) and show measurable effects.

All figures below were measured by `python -m zoo.card` on the shipped files
(`measurements.json`), except the training figures, which come from the training run's
`train_log.json`.

## Architecture
{res["parameters"]:,} parameters: hidden 256, intermediate 768, 6 layers, 4 attention heads and
2 key/value heads (head dim 64), vocabulary 4096 (byte-level BPE trained on the training split),
tied input/output embeddings, weights stored as float16 safetensors.

## Data
Public-domain (or permissively licensed) English text from Debian packages, split **by
document** into training and held-out parts with no overlap (seeded; see `corpus_manifest.json`
for the document lists, byte counts, package versions and licence texts).

| source | Debian packages | licence | documents train / held-out | bytes train / held-out |
|---|---|---|---|---|
{src_rows}

`heldout.txt` (the embedded evaluation text, {res["eval_tokens_total"]:,} tokens) is the held-out
part; `calib.txt` (calibration text) is drawn from training documents only.

## Training
`python -m zoo.train --corpus .carry/corpus --out <dir> --device cuda --max-epochs 8`:
AdamW (lr {log["args"].get("lr")}, weight decay {log["args"].get("weight_decay")}, betas (0.9, 0.95)),
warmup then cosine decay, random {log["args"].get("seq_len")}-token windows, batch
{log["args"].get("batch_size")}, bf16 autocast, seed {log["args"].get("seed")}.
{log["steps"]} steps, {log["tokens_seen"]:,} tokens ({log["epochs"]} epochs), {log["train_seconds"]} s of
training ({log["wall_seconds"]} s wall) on {env.get("device", "?")} with torch {env.get("torch", "?")}.
Eight epochs were chosen from runs of 2, 4, 8 and 16 epochs by held-out perplexity (the corpus
is small: longer training overfits). GPU training is not bit-for-bit repeatable.

![loss curve](loss_curve.png)

## Measured quality (held-out text, non-overlapping windows of {res["seqlen"]}, {res["eval_tokens"]:,} tokens)

| model | perplexity | vs fp16 |
|---|---|---|
| unigram (same tokenizer, add-one, counted on {res["unigram_counted_on"]}) | {res["unigram"]:.2f} | |
| qtutor-tiny, fp32 compute, fp32 copy of the fp16 weights | {res["fp32"]:.3f} | |
| qtutor-tiny, fp16 | {res["fp16"]:.3f} | |
| RTN INT8 per channel (symmetric) | {res["rtn_int8_per_channel"]:.3f} | {rel("rtn_int8_per_channel"):+.2f}% |
| RTN INT4 per channel (asymmetric) | {res["rtn_int4_per_channel"]:.3f} | {rel("rtn_int4_per_channel"):+.2f}% |
| RTN INT4 group 128 (asymmetric) | {res["rtn_int4_g128"]:.3f} | {rel("rtn_int4_g128"):+.2f}% |

fp32 vs fp16: {100 * (res["fp16"] / res["fp32"] - 1):+.3f}%.

## Greedy sample
Prompt "{res["sample_prompt"]}":

> {res["sample"].replace(chr(10), " ")}

## Licence
The weights and tokenizer are released under the MIT licence with the rest of qtutor; the texts
keep the licences listed above.
"""


if __name__ == "__main__":
    main()
