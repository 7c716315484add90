"""Declared versions and version-independent results.

* The installed packages meet the minimums ``pyproject.toml`` declares (CI's second virtualenv
  installs exactly those minimums and runs the package tests there), ``environment.yml`` repeats
  the same pins, and numpy's cap (coremltools 9.0's converter breaks on numpy 2.4) sits on the
  ``coreml`` and ``dev`` extras only: ``pip install qtutor`` never downgrades numpy.
* The embedded model's ``config.json`` gives its RoPE base in both spellings (transformers 5's
  ``rope_parameters``; transformers 4's ``rope_theta``, which would otherwise fall back to
  10000 without a word), and its logits under the installed transformers equal a plain-torch
  Qwen2 forward written here from the safetensors file, so they are the same under every
  transformers release that passes this test.
"""

import json
import math
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import qtutor
from qtutor.data import embedded_text
from qtutor.models import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("torch", "transformers", "tokenizers", "safetensors", "datasets", "numpy", "matplotlib", "seaborn", "tqdm")


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _minimum(req: Requirement):
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(lows) if lows else None


def test_installed_versions_meet_the_declared_minimums():
    deps = {Requirement(d).name: Requirement(d) for d in _pyproject()["dependencies"]}
    assert set(PINNED) <= set(deps)
    for name in PINNED:
        low = _minimum(deps[name])
        assert low is not None, f"{name} has no minimum in pyproject.toml"
        installed = Version(version(name))
        assert installed.release >= low.release, f"{name} {installed} is below the declared {low}"


def test_numpy_cap_only_on_the_coreml_extras_and_environment_yml_agrees():
    project = _pyproject()
    base = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    assert not any(s.operator in ("<", "<=", "==", "~=") for s in base["numpy"].specifier), (
        "the base install must never cap numpy (it would downgrade Colab's)"
    )
    for extra in ("coreml", "dev"):
        reqs = {Requirement(d).name: Requirement(d) for d in project["optional-dependencies"][extra]}
        assert "coremltools" in reqs and any(s.operator == "<" for s in reqs["numpy"].specifier), extra
    # environment.yml: the same specifiers as pyproject.toml (base and [dev]) for what both name
    env = {}
    for line in (ROOT / "environment.yml").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s+- ([A-Za-z][\w.-]*[^#\s]*)", line)
        if m and not m.group(1).startswith(("python=", "pip")):
            r = Requirement(m.group(1))
            env[r.name] = r.specifier
    for d in project["dependencies"] + project["optional-dependencies"]["dev"]:
        r = Requirement(d)
        if r.name == "numpy":  # the base range, narrowed by [dev]'s cap: the env holds the narrow one
            continue
        assert env.get(r.name) == r.specifier, f"environment.yml: {r.name} {env.get(r.name)} != {r.specifier}"
    dev_numpy = [Requirement(d) for d in project["optional-dependencies"]["dev"] if d.startswith("numpy")][0]
    assert env["numpy"] == base["numpy"].specifier & dev_numpy.specifier


# --------------------------------------------------------------------------- embedded model, RoPE
def _config():
    return json.loads((embedded_model_dir() / "config.json").read_text(encoding="utf-8"))


def test_config_gives_the_rope_base_in_both_spellings():
    from transformers import AutoConfig

    raw = _config()
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] == 1e6
    assert raw["rope_parameters"]["rope_type"] == "default"
    config = AutoConfig.from_pretrained(embedded_model_dir())
    rope = getattr(config, "rope_parameters", None) or {}  # transformers 5
    assert rope.get("rope_theta", getattr(config, "rope_theta", None)) == 1e6  # or transformers 4


def reference_logits(ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Qwen2's forward (RMSNorm, GQA attention with q/k/v biases and RoPE, SwiGLU MLP, tied
    head) in plain torch, fp32, from ``model.safetensors``: no transformers code involved."""
    from safetensors.torch import load_file

    c = _config()
    W = {k: v.float() for k, v in load_file(embedded_model_dir() / "model.safetensors").items()}
    nh, nkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = c["hidden_size"] // nh
    T = ids.numel()
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    angles = torch.arange(T).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x):  # (heads, T, hd), rotate-half layout
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    def proj(x, name, bias=False):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if bias else y

    mask = torch.full((T, T), float("-inf")).triu(1)
    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = proj(h, p + "self_attn.q_proj", True).view(T, nh, hd).transpose(0, 1)
        k = proj(h, p + "self_attn.k_proj", True).view(T, nkv, hd).transpose(0, 1)
        v = proj(h, p + "self_attn.v_proj", True).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1)
        x = x + proj((att @ v).transpose(0, 1).reshape(T, nh * hd), p + "self_attn.o_proj")
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(proj(h, p + "mlp.gate_proj"))
        x = x + proj(gate * proj(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return rms(x, W["model.norm.weight"]) @ W["model.embed_tokens.weight"].T


@pytest.fixture(scope="module")
def tiny_logits():
    model, tok = qtutor.load_model("qtutor-tiny")
    ids = tok(embedded_text("heldout")[:4000], return_tensors="pt").input_ids[0, :256]
    with torch.no_grad():
        return ids, model(ids[None]).logits[0]


def test_embedded_logits_equal_a_plain_torch_forward(tiny_logits):
    ids, logits = tiny_logits
    ref = reference_logits(ids, theta=1e6)
    assert torch.allclose(logits, ref, rtol=0, atol=2e-4), (logits - ref).abs().max()
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    # the check has teeth: the RoPE base transformers 4 would use without ``rope_theta``
    wrong = reference_logits(ids, theta=1e4)
    assert (logits - wrong).abs().max() > 100 * 2e-4
