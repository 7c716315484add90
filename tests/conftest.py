"""Shared fixtures: tiny random Qwen2 and Llama models built in memory (no downloads)."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K-qwen2-hf"
WIKITEXT = SHARED / "data" / "hf-wikitext"


def tiny_config(family: str = "qwen2", **overrides):
    """A 2-layer model with GQA, widths that allow group size 32, vocab 128."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    return Qwen2Config(**common) if family == "qwen2" else LlamaConfig(**common)


def tiny_model(family: str = "qwen2", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    if family == "qwen2":  # random q/k/v biases so that bias handling is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.02)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny matrices: a second intra-op thread only costs time, and on a busy 2-core machine
    it made some tests 10-30 times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["qwen2", "llama"])
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def calib_windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (8, 32), generator=g)


#: hidden channels that ``planted_model`` turns into activation outliers
OUTLIERS = (3, 17, 40, 51)


def planted_model(family, factor=50.0, **overrides):
    """The tiny model with a few hidden channels of the embedding scaled by ``factor``: the
    residual stream then carries activation outliers, what AWQ and SmoothQuant exist for."""
    model = tiny_model(family, **overrides)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, list(OUTLIERS)] *= factor
    return model


def logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


@pytest.fixture
def eval_windows():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def run_fresh_python(script: str, tmp_path) -> str:
    """Run ``script`` in a fresh Python process from the repository root (the sm_90 compile
    checks: Triton's interpreter, used by other tests, leaves triton.language patched in this
    one) with its own Triton cache; asserts it exited 0 and returns its stdout."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": root}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
