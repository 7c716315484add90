"""qtutor.book: the helpers every chapter uses (budgets, the fits-in-memory check, notes)."""

import os
from types import SimpleNamespace

import pytest
import torch

from qtutor import book
from qtutor.errors import QtutorError
from qtutor.models import QWEN2_0_5B

QWEN = SimpleNamespace(**QWEN2_0_5B)
TINY = SimpleNamespace(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=5,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=512,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_budget_keeps_small_models_and_gpus_whole(device):
    for config, run_on in ((TINY, device), (QWEN, "cuda")):
        b = book.budget(config, run_on, 2048, None, 128, 512)
        assert (b.seqlen, b.max_eval_tokens, b.calib_windows, b.calib_seqlen) == (2048, None, 128, 512)


def test_budget_lowers_a_large_model_on_a_cpu():
    b = book.budget(QWEN, "cpu", 2048, None, 128, 2048)
    assert b.seqlen == book.CPU_SEQLEN and b.max_eval_tokens == book.CPU_EVAL_WINDOWS * book.CPU_SEQLEN
    assert b.calib_windows == book.CPU_CALIB_WINDOWS and b.calib_seqlen == book.CPU_SEQLEN
    # never raises a size the chapter chose smaller
    small = book.budget(QWEN, "cpu", 256, 512, 4, 128)
    assert (small.seqlen, small.max_eval_tokens, small.calib_windows, small.calib_seqlen) == (256, 512, 4, 128)


def test_bytes_needed_counts_qwen2_0_5b_parameters():
    # 494,032,768 parameters without the norms and biases (which the estimate leaves out)
    n = book._bytes_needed(QWEN, torch.float16, 1.0) / 2
    assert 0.99 * 494_032_768 < n <= 494_032_768


def test_check_fits_refuses_in_one_line(monkeypatch):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**30))
    with pytest.raises(QtutorError) as err:
        book.check_fits(QWEN, "cpu", torch.float32)
    msg = str(err.value)
    assert "\n" not in msg and "GiB" in msg and "smaller MODEL" in msg
    book.check_fits(TINY, "cpu", torch.float32)  # a small model fits


def test_describe_says_random_weights_and_cpu_budget():
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(**QWEN2_0_5B, qtutor_random_weights=True)
    text = book.describe(model, "cpu")
    assert "RANDOM WEIGHTS" in text and f"{book.CPU_SEQLEN} tokens" in text
    model.config.qtutor_random_weights = False
    assert "RANDOM" not in book.describe(model, "cuda") and "CPU" not in book.describe(model, "cuda")


@pytest.mark.parametrize("width, expected", [(896, 128), (64, 32), (172, 8), (4864, 128), (256, 128)])
def test_pick_group_size(width, expected):
    g = book.pick_group_size(width)
    assert g == expected and (width % g == 0 or g == 8)


def test_load_model_embedded_notes(capsys):
    model, tok = book.load_model("qtutor-tiny", "cpu")
    assert next(model.parameters()).dtype == torch.float32 and tok is not None
    assert "float32 on cpu" in capsys.readouterr().out


def test_load_tokenizer_is_the_models_own_and_a_missing_folder_is_one_line(tmp_path):
    from qtutor import QtutorError
    from qtutor.models import load_model, load_tokenizer

    _, tok = load_model("qtutor-tiny")
    text = "The quick brown fox jumps over the lazy dog."
    assert load_tokenizer("qtutor-tiny")(text).input_ids == tok(text).input_ids
    with pytest.raises(QtutorError, match="not found"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_setup_quiets_the_libraries_seeds_and_styles(monkeypatch):
    import matplotlib
    import transformers

    import qtutor.book

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setitem(matplotlib.rcParams, "figure.dpi", 72)
    device = qtutor.book.setup(seed=3)
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert os.environ["TQDM_DISABLE"] == "1"
    assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
    assert matplotlib.rcParams["figure.dpi"] == 110
    a = torch.rand(3)
    qtutor.book.setup(seed=3)
    assert torch.equal(a, torch.rand(3))


def test_eval_seqlen_is_the_benchmarks_window():
    from transformers import Qwen2Config

    import qtutor.book
    from qtutor.bench import BenchConfig, plan_run
    from qtutor.models import QWEN2_0_5B, load_config

    assert qtutor.book.eval_seqlen(Qwen2Config(**QWEN2_0_5B)) == 2048
    tiny = load_config("qtutor-tiny")
    assert qtutor.book.eval_seqlen(tiny) == min(512, tiny.max_position_embeddings)
    assert qtutor.book.eval_seqlen(Qwen2Config(**{**QWEN2_0_5B, "max_position_embeddings": 1024})) == 1024
    assert plan_run(BenchConfig(device="cpu")).seqlen == qtutor.book.eval_seqlen(tiny)
