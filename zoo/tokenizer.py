"""Byte-level BPE tokenizer of qtutor-tiny.

Trained with the ``tokenizers`` library on the training split only (see
``zoo.corpus``, which calls :func:`train_tokenizer` and
:func:`check_tokenizer`). The only special token is ``<|endoftext|>``, used as
bos, eos and pad token. Encoding adds no special tokens, so that
``decode(encode(text)) == text`` for any text.

The normalizer (NFC) and pre-tokenizer (Qwen2's split regex, which among
other things splits digits one by one, then byte-level mapping) are exactly
those of Qwen2's tokenizer: recent ``transformers`` releases make
``AutoTokenizer`` build a ``Qwen2Tokenizer`` from the vocabulary and merges for
any ``model_type: qwen2`` checkpoint, ignoring the ``tokenizer_class`` saved
in ``tokenizer_config.json`` and the pipeline in ``tokenizer.json``. With the
same pipeline in both, ``AutoTokenizer`` and ``PreTrainedTokenizerFast`` give
identical ids whichever class a release picks. ``tokenizer_class`` is still
set to ``PreTrainedTokenizerFast`` for the releases that honour it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOS = "<|endoftext|>"

# Qwen2's pre-tokenization regex (transformers' models/qwen2/tokenization_qwen2.py).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Strings that must survive encode/decode, besides held-out text.
_ROUND_TRIP_EXTRAS = (
    "",
    " leading and trailing spaces  ",
    "Tabs\tand\r\nWindows line ends, digits 0123456789.",
    "Unicode: café, naïve, Ørsted, 日本語, emoji \U0001f600.",
    f"a literal {EOS} inside text",
)


def train_tokenizer(train_txt: Path, out_dir: Path, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``train_txt``; save it to ``out_dir``.

    ``out_dir`` receives ``tokenizer.json`` and ``tokenizer_config.json`` (plus
    whatever else ``save_pretrained`` of the installed transformers writes).
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(train_txt)], trainer)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tokenizer


def check_tokenizer(tokenizer_dir: Path, text: str, max_docs: int = 300) -> str:
    """Check that the saved tokenizer loads and round-trips, or raise ``AssertionError``.

    Loads ``tokenizer_dir`` both with ``PreTrainedTokenizerFast`` and, next to
    a minimal Qwen2 ``config.json``, with ``AutoTokenizer``; both must give the
    same ids as the raw ``tokenizers`` file, and decoding must give back the
    input exactly, for the first ``max_docs`` documents of ``text`` (documents
    being separated by blank lines), the whole of ``text`` and a few extras.
    ``text`` must be NFC-normalised. Returns the class name AutoTokenizer chose.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for path in tokenizer_dir.iterdir():
            shutil.copy2(path, tmp)
        Path(tmp, "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        auto = AutoTokenizer.from_pretrained(tmp)
    eos_id = raw.token_to_id(EOS)
    assert fast.eos_token_id == fast.bos_token_id == fast.pad_token_id == eos_id
    assert auto.eos_token_id == eos_id

    samples = text.split("\n\n")[:max_docs] + list(_ROUND_TRIP_EXTRAS)
    for sample in samples:
        ids = raw.encode(sample).ids
        for name, loaded in (("PreTrainedTokenizerFast", fast), ("AutoTokenizer", auto)):
            assert loaded.encode(sample, verbose=False) == ids, f"{name} ids differ on {sample[:60]!r}"
        assert fast.decode(ids) == sample, f"round trip fails on {sample[:60]!r}"
        assert auto.decode(ids) == sample, f"AutoTokenizer round trip fails on {sample[:60]!r}"
    ids = raw.encode(text).ids
    assert raw.decode(ids, skip_special_tokens=False) == text, "round trip fails on the whole text"
    return type(auto).__name__
