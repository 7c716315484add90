"""Load a causal LM and describe where its quantizable parts are (ARCHITECTURE.md section 2).

``load_model(name)`` accepts

* ``"qtutor-tiny"``: the embedded default shipped in ``qtutor/assets/`` (works offline);
* a local folder with ``config.json`` and weights (e.g. a Hugging Face export of a small Qwen2 or Llama model);
* a Hugging Face Hub id such as ``"Qwen/Qwen2-0.5B"`` (needs the network).

``layout_for(model)`` returns a :class:`Layout`: the decoder layers, the linears of one layer in
true-sequential order, and the norm -> linear and linear -> linear pairs that AWQ and
SmoothQuant rescale. Qwen2 and Llama share the same module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import QtutorError

EMBEDDED_MODEL = "qtutor-tiny"
ASSETS = Path(__file__).parent / "assets"


def embedded_model_dir() -> Path:
    return ASSETS / EMBEDDED_MODEL


@dataclass(frozen=True)
class Layout:
    """Where the quantizable linears of a decoder-only family live.

    ``sequential``: groups of linears of one decoder layer in the order the data flows
    (GPTQ's "true sequential": q/k/v, then o, then gate/up, then down); the linears of a group
    read the same input.
    ``norm_groups``: (norm, linears fed by it); ``linear_pairs``: (producer, consumer) where the
    consumer's input is exactly the producer's output (v -> o, up -> down).
    """

    family: str
    sequential: tuple[tuple[str, ...], ...]
    norm_groups: tuple[tuple[str, tuple[str, ...]], ...]
    linear_pairs: tuple[tuple[str, str], ...]
    attention: str = "self_attn"
    mlp: str = "mlp"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embed(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last decoder layer and the lm_head."""
        return model.model.norm

    def linear_names(self) -> list[str]:
        return [name for group in self.sequential for name in group]

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {name: layer.get_submodule(name) for name in self.linear_names()}


_QWEN2_LLAMA = Layout(
    family="qwen2/llama",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm_groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_pairs=(("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")),
)

LAYOUTS = {"qwen2": _QWEN2_LLAMA, "llama": _QWEN2_LLAMA, "mistral": _QWEN2_LLAMA}


def layout_for(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model`` (or of a ``transformers`` config); a one-line error for
    a model type qtutor has no layout for."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise QtutorError(f"model type {model_type!r} has no layout in qtutor; supported: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[model_type]


def resolve_model(name: str) -> str:
    """The local folder or Hub id that ``name`` refers to."""
    if name == EMBEDDED_MODEL:
        d = embedded_model_dir()
        if not (d / "config.json").exists():
            raise QtutorError(f"the embedded model is missing from {d}; reinstall qtutor")
        return str(d)
    return name


def _load_tokenizer(path: str):
    """``AutoTokenizer``, except for local qwen2 folders whose tokenizer is not Qwen2's own:
    AutoTokenizer would pick Qwen2's class from ``model_type`` and mis-tokenize."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").exists() and not (p / "merges.txt").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(name: str = EMBEDDED_MODEL):
    """The tokenizer of ``name`` (embedded name, local folder or Hub id), without the weights."""
    load_config(name)  # a missing folder or an unreachable Hub id: the one-line errors of load_config
    path = resolve_model(name)
    try:
        return _load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise QtutorError(f"cannot load the tokenizer of {path!r}: {str(err).splitlines()[0]}") from err


def load_config(name: str = EMBEDDED_MODEL):
    """The transformers config of ``name``: a cheap check that the model can be had at all."""
    from transformers import AutoConfig

    path = resolve_model(name)
    local = Path(path).is_dir()
    if not local and (Path(path).exists() or not _looks_like_hub_id(path)):
        raise QtutorError(
            f"model folder {path!r} not found; pass an existing folder, a Hub id, "
            f"or leave --model out for the embedded {EMBEDDED_MODEL!r}"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        if local:
            raise QtutorError(f"cannot load a model from folder {path!r}: {str(err).splitlines()[0]}") from err
        raise QtutorError(
            f"cannot fetch {path!r} from the Hugging Face Hub (offline or unknown id); "
            f"use the embedded model ({EMBEDDED_MODEL!r}, the default) or "
            f"--model DIR with a local copy"
        ) from err


def load_model(
    name: str = EMBEDDED_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu", with_tokenizer: bool = True
):
    """Load ``name`` (embedded name, local folder or Hub id) -> (model, tokenizer).

    The model is in eval mode on ``device`` with parameters in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    layout_for(load_config(name))  # an unsupported model type fails before any weight is read
    path = resolve_model(name)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = _load_tokenizer(path) if with_tokenizer else None
    except SafetensorError as err:  # a truncated or damaged model.safetensors
        raise QtutorError(
            f"the weights of {path!r} are damaged ({str(err).splitlines()[0]}); copy or download the model again"
        ) from err
    except OSError as err:
        raise QtutorError(f"cannot load model weights or tokenizer of {path!r}: {str(err).splitlines()[0]}") from err
    model = model.to(device).eval()
    _refuse_non_finite(model, path, dtype)  # on the device: a GPU checks 0.5B weights in milliseconds
    return model, tokenizer


def _refuse_non_finite(model: nn.Module, path: str, dtype: torch.dtype) -> None:
    """A one-line error naming the first tensor with NaN or Inf values (quantizers would hide
    them in plausible-looking numbers)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise QtutorError(
                f"weight {name} of {path!r} holds {bad} NaN/Inf values (as "
                f"{str(dtype).replace('torch.', '')}); repair or re-download the model"
                + ("" if dtype == torch.float32 else ", or use --dtype float32 if it only overflows this dtype")
            )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def random_model(
    config_name: str = "Qwen/Qwen2-0.5B",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    **overrides,
):
    """A model with the architecture of ``config_name`` and random weights.

    For timing and memory only (they do not depend on weight values): its perplexity means
    nothing. ``config_name`` may be ``"qwen2-0.5b"`` (the config written out below, usable
    offline), a folder, or a Hub id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    if config_name.lower() in ("qwen2-0.5b", "qwen/qwen2-0.5b"):
        config = Qwen2Config(**{**QWEN2_0_5B, **overrides})
    else:
        load_config(config_name)  # a one-line error for a missing folder or an unknown id
        config = AutoConfig.from_pretrained(resolve_model(config_name), **overrides)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: a 7B model's random init is slow on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


#: the architecture of Qwen/Qwen2-0.5B (its config.json), for offline random-weight timing
QWEN2_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    rope_theta=1000000.0,
    bos_token_id=151643,
    eos_token_id=151643,
)
