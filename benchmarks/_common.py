"""Helpers shared by the benchmark scripts: model configs, environment, CSV and tables."""

from __future__ import annotations

import csv
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: a small Qwen2-shaped config for CPU runs: widths divisible by 128 (group size), GQA, tied head
TINY = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
)
#: larger members of the family (their config.json shapes), where decoding is bandwidth-bound
QWEN2_1_5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
)
QWEN2_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
CONFIGS = {"qwen2-0.5b": {}, "qwen2-1.5b": QWEN2_1_5B, "qwen2-7b": QWEN2_7B, "tiny": TINY}


def build_model(config: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from qtutor.models import random_model

    if config not in CONFIGS:
        raise SystemExit(f"unknown --config {config!r}; choose from {', '.join(CONFIGS)}")
    return random_model("qwen2-0.5b", dtype=dtype, device=str(device), seed=seed, **CONFIGS[config])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    return torch.device(name)


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "-",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def print_env(env: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in env.items()))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format). Missing values print as '-'."""

    def cell(r, k, fmt):
        v = r.get(k)
        if v is None or v == "":
            return "-"
        return format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v)

    data = [[h for _, h, _ in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in data) for i in range(len(cols))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in data
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- quality side by side
def add_quality_args(p) -> None:
    """The options of the scripts that compare perplexities on one model and text (gptq_order.py,
    peers.py): the model, the text, the evaluation window, the calibration windows, the bits."""
    p.add_argument("--model", default="qtutor-tiny")
    p.add_argument("--dataset", default=None, help="embedded or wikitext2 (default: embedded for qtutor-tiny)")
    p.add_argument("--data-dir", default=None, help="WikiText-2 in the Hugging Face layout")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=None, help="default: the whole evaluation text")
    p.add_argument(
        "--eval-text",
        choices=("eval", "calib-heldout"),
        default="eval",
        help="eval: the dataset's evaluation text (WikiText-2 test); calib-heldout: the calibration "
        "text's (WikiText-2 validation) windows of --seqlen that no calibration window touches",
    )
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", required=True, help="OUT.csv is written")


def quality_setup(args):
    """Seed, print the environment, load the model and the texts -> (model, dataset, calibration
    windows, environment, score), ``score(model)`` being ``qtutor.eval.perplexity`` on the
    evaluation text, the same tokens for every row."""
    from qtutor.data import calibration_starts, calibration_windows, dataset_text, tokenize
    from qtutor.eval import perplexity
    from qtutor.models import load_model

    dataset = args.dataset or ("embedded" if args.model == "qtutor-tiny" else "wikitext2")
    torch.manual_seed(0)
    env = environment(torch.device("cpu"))
    print_env(env)
    model, tok = load_model(args.model)
    calib_ids = tokenize(tok, dataset_text(dataset, "calib", args.data_dir))
    calib = calibration_windows(calib_ids, args.calib_samples, args.calib_seqlen, seed=0)
    if getattr(args, "eval_text", "eval") == "calib-heldout":
        starts = calibration_starts(calib_ids.numel(), args.calib_samples, args.calib_seqlen, seed=0)
        eval_ids = untouched_windows(calib_ids, args.seqlen, starts, args.calib_seqlen)
        dataset += " calib-heldout"
        print(
            f"evaluating on {eval_ids.numel() // args.seqlen} windows of the calibration text no calibration window touches"
        )
    else:
        eval_ids = tokenize(tok, dataset_text(dataset, "eval", args.data_dir))

    def score(m):
        return perplexity(m, eval_ids, args.seqlen, args.max_eval_tokens, batch_size=8)

    score.eval_ids = eval_ids  # for kl_to_reference: the same tokens and windows
    return model, dataset, calib, env, score


def untouched_windows(ids: torch.Tensor, seqlen: int, starts, calib_seqlen: int) -> torch.Tensor:
    """The non-overlapping windows of ``seqlen`` of ``ids`` (as ``eval_windows`` cuts them) that
    share no token with any calibration window ``ids[s : s + calib_seqlen]``, ``s`` in ``starts``,
    joined back into one 1-D tensor in their order: cut again into windows of ``seqlen``, it gives
    exactly those windows, so ``perplexity`` and ``kl_to_reference`` score text the calibration
    never saw."""
    from qtutor.data import eval_windows

    touched = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in starts:
        touched[s : s + calib_seqlen] = True
    windows = eval_windows(ids, seqlen)
    keep = ~touched[: windows.numel()].view(-1, seqlen).any(dim=1)
    return windows[keep].reshape(-1)


@torch.no_grad()
def kl_to_reference(model, reference, ids, seqlen: int, max_tokens=None, batch_size: int = 8) -> dict:
    """How far ``model``'s next-token distributions are from ``reference``'s on the windows that
    ``qtutor.eval.perplexity`` scores (non-overlapping windows of ``seqlen``, the first
    ``seqlen - 1`` predictions of each): ``kl_to_float``, the mean over those predictions of
    KL(p_reference || p_model) in nats, and ``top1_agree``, the fraction of them whose most
    likely token is the same in both. Zero and one for identical models. ``window_kl``: each
    window's own mean KL, in window order (the bootstrap's samples; ``kl_to_float`` is their
    mean, every window scoring ``seqlen - 1`` predictions). The reference's log-probabilities
    are computed batch by batch beside the model's, never for the whole text.
    """
    import torch.nn.functional as F

    from qtutor.data import eval_windows

    windows = eval_windows(ids, seqlen, max_tokens)
    device = next(model.parameters()).device
    kl_sum, agree, count, per_window = 0.0, 0, 0, []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        ref = F.log_softmax(reference(batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        out = F.log_softmax(model(batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        p = ref.exp()
        kl = torch.where(p > 0, p * (ref - out), torch.zeros_like(p)).sum(dim=-1)  # (batch, seqlen - 1)
        kl_sum += float(kl.double().sum())
        per_window += kl.double().mean(dim=1).tolist()
        agree += int((ref.argmax(dim=-1) == out.argmax(dim=-1)).sum())
        count += kl.numel()
    return {"kl_to_float": kl_sum / count, "top1_agree": agree / count, "window_kl": per_window}


def layout_name(bits: int, group: int, sym: bool) -> str:
    return f"INT{bits} {'groups of ' + str(group) if group else 'per row'}, {'sym' if sym else 'asym'}"
