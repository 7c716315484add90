"""Train ``qtutor-tiny``: a 5.8M-parameter Qwen2 causal language model.

Usage, on one GPU (the corpus folder comes from ``python -m zoo.corpus``)::

    python -m zoo.train --corpus .carry/corpus --out runs/qtutor-tiny --device cuda

CPU smoke test::

    python -m zoo.train --corpus /tmp/corpus --out /tmp/tiny --device cpu \\
        --max-steps 30 --batch-size 4 --eval-every 10 --eval-windows 4

Training samples random 512-token windows of the tokenized ``train.txt`` and uses
AdamW with linear warmup and cosine decay, in bf16 autocast on CUDA (float32
on CPU). Held-out loss is measured every ``--eval-every`` steps on a fixed set
of held-out windows. Training stops after ``--max-steps`` or when the training
loop has run for ``--time-budget-s`` seconds, whichever comes first. Without
``--max-steps`` the step count is the one that reads ``--max-epochs`` passes
over the training tokens, cut down, if the speed measured over the first
steps says it would not fit, to what fits the time budget, so that the cosine
schedule still ends with the budget. The default of 8 epochs (614 steps,
about 20 seconds of an H100) was chosen from runs of 2, 4, 8 and 16 epochs by
held-out perplexity: the corpus has only 2.5M training tokens, and longer
training overfits it. The step count used is logged, and passing it as
``--max-steps`` repeats the run.

The output folder receives the model as float16 safetensors (``config.json``,
``generation_config.json``, ``model.safetensors``), the tokenizer files, the
held-out text (``heldout.txt``), the corpus manifest (``corpus_manifest.json``),
``train_log.json`` and ``loss_curve.png``. The final held-out perplexity is
measured on the saved float16 weights, reloaded and evaluated in float32, over
the whole held-out text in non-overlapping 512-token windows (each window
predicts its tokens 2..512 from the preceding ones); it is logged next to the
perplexity of a unigram model of the same tokens (probabilities counted on the
training tokens, add-one smoothed) and a greedy sample.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

CALIBRATION_STEPS = (10, 60)  # steps between which the speed is measured (no --max-steps)
TIME_SAFETY = 0.95  # fraction of the remaining time budget that the step count is sized to
EVAL_BATCH_SIZE = 64  # held-out windows per forward pass


def model_config(vocab_size: int, eos_id: int) -> Qwen2Config:
    """The architecture of qtutor-tiny."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,  # head_dim 64
        num_key_value_heads=2,  # grouped-query attention
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def tokenize(tokenizer: Tokenizer, path: Path) -> torch.Tensor:
    """Token ids of a corpus file, as one long tensor.

    Documents (separated by blank lines) are encoded in parallel. This gives the
    same ids as encoding the whole file at once: with Qwen2's pre-tokenizer a
    pre-token boundary always falls after a run of newlines that is followed by
    a letter, digit or punctuation mark, which is where the text is cut.
    """
    docs = path.read_text(encoding="utf-8").split("\n\n")
    chunks = [doc + "\n\n" for doc in docs[:-1]] + docs[-1:]
    ids = [i for encoding in tokenizer.encode_batch(chunks) for i in encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Cut ``ids`` into consecutive non-overlapping windows of ``length`` tokens
    (the last one may be shorter; windows of one token, which predict nothing,
    are dropped)."""
    return [w for w in ids.split(length) if len(w) > 1]


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate: linear warmup to ``peak``, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_nll(model, batches: list[torch.Tensor], device: torch.device, autocast: bool) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and number of predicted tokens."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total, count


def batched(chunks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack windows of equal length into batches (a shorter last window goes alone)."""
    full = [w for w in chunks if len(w) == len(chunks[0])]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    return batches + [w[None] for w in chunks if len(w) != len(chunks[0])]


def unigram_nll(train_ids: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Summed negative log-likelihood of ``targets`` under an add-one-smoothed
    unigram model counted on ``train_ids``."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    log_probs = counts.log() - counts.sum().log()
    return -log_probs[targets].sum().item()


def plot_loss_curve(log: dict, path: Path) -> None:
    """Draw training and held-out loss against steps into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    train_steps, train_losses = zip(*log["train_loss"], strict=True)
    ax.plot(train_steps, train_losses, label="train (mean over logging interval)", lw=1.2)
    eval_steps, eval_losses = zip(*log["heldout_loss"], strict=True)
    ax.plot(eval_steps, eval_losses, "o-", ms=3, label="held-out (fixed windows)", lw=1.2)
    unigram = math.log(log["final"]["unigram_perplexity"])
    ax.axhline(unigram, color="grey", ls="--", lw=1, label=f"unigram baseline ({unigram:.2f})")
    ax.set_ylim(top=min(max(eval_losses + train_losses) + 0.1, unigram + 1.5))
    ax.set_title(f"qtutor-tiny training ({log['parameters'] / 1e6:.1f}M parameters)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="folder written by zoo.corpus")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-steps", type=int, help="default: from --max-epochs and the time budget")
    parser.add_argument("--max-epochs", type=float, default=8.0, help="see the module's doc")
    parser.add_argument("--time-budget-s", type=float, default=420.0, help="for the training loop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows per eval")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="use torch.compile")
    parser.add_argument("--prompt", default="In the beginning", help="prompt of the logged sample")
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="only redraw OUT/loss_curve.png from OUT/train_log.json (e.g. where the "
        "training machine lacked matplotlib)",
    )
    args = parser.parse_args(argv)
    if not args.plot_only and args.corpus is None:
        parser.error("--corpus is required")
    return args


def train(args: argparse.Namespace) -> dict:
    """Train, save and evaluate the model; return the training log."""
    wall_start = time.time()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer_dir = args.corpus / "tokenizer"
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    train_ids = tokenize(tokenizer, args.corpus / "train.txt")
    heldout_ids = tokenize(tokenizer, args.corpus / "heldout.txt")
    print(f"tokens: {len(train_ids)} train, {len(heldout_ids)} held-out")

    heldout_windows = windows(heldout_ids, args.seq_len)
    picked = torch.linspace(0, len(heldout_windows) - 2, args.eval_windows).long().unique()
    eval_batches = batched([heldout_windows[i] for i in picked], EVAL_BATCH_SIZE)

    config = model_config(tokenizer.get_vocab_size(), eos_id)
    model = Qwen2ForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    step_model = torch.compile(model) if args.compile else model

    # Sampling on the device itself keeps the host from waiting for the device.
    generator = torch.Generator(device=device).manual_seed(args.seed)
    train_ids_on_device = train_ids.to(device)
    offsets = torch.arange(args.seq_len + 1, device=device)
    n_starts = len(train_ids) - args.seq_len - 1
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = args.max_steps or math.ceil(args.max_epochs * len(train_ids) / tokens_per_step)
    max_steps_from = "--max-steps" if args.max_steps else f"--max-epochs {args.max_epochs}"
    log = {"train_loss": [], "heldout_loss": [], "lr": []}
    running, running_steps = torch.zeros((), device=device), 0
    stopped_by = "max_steps"
    step = 0
    train_start = time.time()
    while step < max_steps:
        if step % args.eval_every == 0:
            total, count = heldout_nll(model, eval_batches, device, autocast)
            log["heldout_loss"].append([step, round(total / count, 4)])
            print(f"step {step}: held-out loss {total / count:.4f}")

        lr = lr_at(step, args.lr, args.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(n_starts, (args.batch_size, 1), generator=generator, device=device)
        batch = train_ids_on_device[starts + offsets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = step_model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        running_steps += 1
        step += 1

        if args.max_steps is None and step in CALIBRATION_STEPS and step < max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == CALIBRATION_STEPS[0]:
                calibration_start = time.time()
            else:
                per_step = (time.time() - calibration_start) / (step - CALIBRATION_STEPS[0])
                remaining = args.time_budget_s - (time.time() - train_start)
                fitting = step + int(TIME_SAFETY * remaining / per_step)
                if fitting < max_steps:
                    max_steps, max_steps_from = fitting, "--time-budget-s and measured speed"
                print(f"{per_step * 1000:.1f} ms/step: training for {max_steps} steps")
        out_of_time = time.time() - train_start > args.time_budget_s and step < max_steps
        if step % args.log_every == 0 or step == max_steps or out_of_time:
            mean = running.item() / running_steps
            log["train_loss"].append([step, round(mean, 4)])
            log["lr"].append([step, lr])
            elapsed = time.time() - train_start
            tokens_per_s = step * tokens_per_step / elapsed
            print(f"step {step}: loss {mean:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s {elapsed:.0f}s")
            running, running_steps = torch.zeros((), device=device), 0
        if out_of_time:
            stopped_by = "time_budget"
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - train_start
    if log["heldout_loss"][-1][0] != step:
        total, count = heldout_nll(model, eval_batches, device, autocast)
        log["heldout_loss"].append([step, round(total / count, 4)])

    # Save float16 weights with the tokenizer, held-out text and corpus manifest.
    model.half().save_pretrained(args.out, safe_serialization=True)
    for path in args.out.glob("*.safetensors"):
        path.chmod(0o644)  # save_pretrained leaves them readable by their owner only
    for path in tokenizer_dir.iterdir():
        shutil.copy2(path, args.out / path.name)
    shutil.copy2(args.corpus / "heldout.txt", args.out / "heldout.txt")
    shutil.copy2(args.corpus / "manifest.json", args.out / "corpus_manifest.json")
    del model, step_model, optimizer, train_ids_on_device

    # Evaluate what was saved: reload in float32, whole held-out text.
    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    nll, predicted = heldout_nll(saved, batched(heldout_windows, EVAL_BATCH_SIZE), device, False)
    targets = torch.cat([w[1:] for w in heldout_windows])
    unigram = unigram_nll(train_ids, targets, tokenizer.get_vocab_size())
    hf_tokenizer = AutoTokenizer.from_pretrained(args.out)
    prompt = hf_tokenizer(args.prompt, return_tensors="pt").to(device)
    generated = saved.generate(**prompt, max_new_tokens=60, do_sample=False, pad_token_id=eos_id)
    completion = hf_tokenizer.decode(generated[0, prompt.input_ids.shape[1] :])

    tokens_seen = step * tokens_per_step
    log = {
        "model": "qtutor-tiny",
        "parameters": n_params,
        "architecture": config.to_diff_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "corpus": {
            "train_tokens": len(train_ids),
            "heldout_tokens": len(heldout_ids),
            "manifest": "corpus_manifest.json",
        },
        "max_steps": max_steps,
        "max_steps_from": max_steps_from,
        "steps": step,
        "stopped_by": stopped_by,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / len(train_ids), 2),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / train_seconds),
        **log,
        "final": {
            "weights": "float16 as saved, evaluated in float32",
            "heldout_windows": len(heldout_windows),
            "heldout_tokens_predicted": predicted,
            "heldout_loss": round(nll / predicted, 4),
            "heldout_perplexity": round(math.exp(nll / predicted), 3),
            "unigram_perplexity": round(math.exp(unigram / predicted), 3),
        },
        "sample": {"prompt": args.prompt, "greedy_new_tokens": 60, "completion": completion},
        "wall_seconds": round(time.time() - wall_start, 1),
    }
    text = json.dumps(log, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: f"[{' '.join(m[1].split())}]", text)
    (args.out / "train_log.json").write_text(text + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot_only:
        log = json.loads((args.out / "train_log.json").read_text())
    else:
        log = train(args)
        final = log["final"]
        print(
            f"held-out perplexity {final['heldout_perplexity']} "
            f"(unigram {final['unigram_perplexity']}) after {log['steps']} steps, "
            f"{log['epochs']} epochs, {log['train_seconds']} s"
        )
        print(f"sample: {log['sample']['prompt']}{log['sample']['completion']!r}")
    try:
        plot_loss_curve(log, args.out / "loss_curve.png")
    except ImportError:
        print("matplotlib is missing: redraw the curve elsewhere with --plot-only")


if __name__ == "__main__":
    main()
