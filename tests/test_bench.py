"""``qtutor bench`` end to end on a tiny random model, resume, and every documented bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import qtutor
import torch

from conftest import tiny_model
from qtutor.cli import bench_main as main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "A small model reads a small text. ") * 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 saved with a byte-level BPE tokenizer trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT],
        trainers.BpeTrainer(
            vocab_size=128, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    tiny_model("qwen2", vocab_size=tok.get_vocab_size()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A WikiText-2 look-alike in the Hugging Face layout (what ../shared/data/hf-wikitext holds)."""
    import datasets

    d = tmp_path_factory.mktemp("wikitext")
    (d / "wikitext-2-raw-v1").mkdir()
    (d / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n"
        "  - split: validation\n    path: wikitext-2-raw-v1/validation-*\n---\n"
    )
    lines = [line + "\n" for line in TEXT.split(". ")]
    for split in ("test", "validation"):
        datasets.Dataset.from_dict({"text": lines}).to_parquet(
            str(d / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
        )
    return d


def bench_args(model_dir, data_dir, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--dataset",
        "wikitext2",
        "--data-dir",
        str(data_dir),
        "--seqlen",
        "32",
        "--max-eval-tokens",
        "640",
        "--calib-samples",
        "4",
        "--latency-tokens",
        "4",
        "--latency-runs",
        "1",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (["rtn_int4", "fp16_baseline"], ["rtn_int4", "fp16_baseline"]),  # the original benchmark's form
        (["rtn_int4,fp16_baseline"], ["rtn_int4", "fp16_baseline"]),
        (["rtn_int4,", "qlora_nf4", "rtn_int8"], ["rtn_int4", "qlora_nf4", "rtn_int8"]),
        (["all"], None),
    ],
)
def test_methods_by_spaces_or_commas(spec, expected):
    from qtutor.bench import parse_methods
    from qtutor.cli import build_parser
    from qtutor.quant import implemented_methods

    args = build_parser().parse_args(["--methods", *spec])
    assert parse_methods(args.methods) == (expected or implemented_methods())


def test_methods_space_separated_end_to_end(model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(bench_args(model_dir, data_dir, out, "--methods", "fp16_baseline", "rtn_int4")) == 0
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["fp16_baseline", "rtn_int4"]


def test_bench_end_to_end(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(bench_args(model_dir, data_dir, out, "--methods", "fp16_baseline,rtn_int8,rtn_int4", "--group-size", "32"))
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["fp16_baseline", "rtn_int8", "rtn_int4"]
    for r in res["methods"].values():
        assert set(r) >= {
            "ppl",
            "eval_tokens",
            "seqlen",
            "bits_per_weight",
            "memory_mb",
            "compression_ratio",
            "latency_ms_per_token",
            "quant_seconds",
        }
        assert r["ppl"] > 1 and r["seqlen"] == 32 and r["eval_tokens"] == 640
    m = res["methods"]
    assert m["fp16_baseline"]["bits_per_weight"] == 16
    assert m["rtn_int4"]["bits_per_weight"] == pytest.approx(
        4 + 20 / 32, rel=0.01
    )  # group 32 applies to INT4 (zeros padded to bytes)
    assert m["rtn_int8"]["bits_per_weight"] == pytest.approx(8 + 16 / 32, rel=0.01)  # and to INT8
    assert m["fp16_baseline"]["compression_ratio"] == pytest.approx(1.0)
    assert m["rtn_int4"]["memory_mb"] < m["rtn_int8"]["memory_mb"] < m["fp16_baseline"]["memory_mb"]
    for f in ("results.csv", "ppl_vs_bits.png", "memory.png", "latency.png"):
        assert (out / f).stat().st_size > 0
    assert "rtn_int4" in capsys.readouterr().out


def test_bench_hands_back_a_kept_model(model_dir, data_dir, tmp_path):
    """main(..., keep=) returns the quantized model the bench measured: its perplexity is the
    recorded one, and methods not asked for are not kept."""
    from qtutor.eval import perplexity
    from qtutor.quant.palettize import PalettizedLinear

    out = tmp_path / "run"
    keep = {"palettization_4bit": None, "base": None}
    assert main(bench_args(model_dir, data_dir, out, "--methods", "rtn_int4,palettization_4bit"), keep=keep) == 0
    assert set(keep) == {"palettization_4bit", "base"}
    model, report = keep["palettization_4bit"]
    base = keep["base"]  # the float model: nn.Linear layers, the loaded weights
    assert type(base.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not any(isinstance(m, PalettizedLinear) for m in base.modules())
    from qtutor.models import load_model

    loaded, _ = load_model(str(model_dir))
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(base.state_dict().values(), loaded.state_dict().values()))
    assert report.method == "palettization_4bit"
    assert any(isinstance(m, PalettizedLinear) for m in model.modules())
    res = json.loads((out / "results.json").read_text())["methods"]["palettization_4bit"]
    from qtutor.data import dataset_text, tokenize
    from transformers import PreTrainedTokenizerFast

    ids = tokenize(PreTrainedTokenizerFast.from_pretrained(model_dir), dataset_text("wikitext2", "eval", str(data_dir)))
    assert perplexity(model, ids, 32, 640, batch_size=4).ppl == pytest.approx(res["ppl"], rel=1e-4)


def test_a_kept_model_is_the_one_quantize_made_not_the_timed_one(model_dir, data_dir, tmp_path, monkeypatch):
    """The decode timing may give a model fast kernels and extra buffers: a kept model is handed
    back as quantize() made it (the chapters export and re-measure it), the timing runs on a copy."""
    import qtutor.bench as b
    from qtutor.eval import memory_report

    real, timed = b._latency, []

    def latency_that_adds_a_buffer(model, prompt, args, device):
        model.register_buffer("kernel_scratch", torch.zeros(1 << 16))
        timed.append(model)
        return real(model, prompt, args, device)

    monkeypatch.setattr(b, "_latency", latency_that_adds_a_buffer)
    keep = {"rtn_int4": None}
    assert main(bench_args(model_dir, data_dir, tmp_path / "run", "--methods", "rtn_int4"), keep=keep) == 0
    model, _ = keep["rtn_int4"]
    assert timed and timed[0] is not model and not hasattr(model, "kernel_scratch")
    res = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["rtn_int4"]
    assert memory_report(model).total_mb == pytest.approx(res["memory_mb"])


def test_memory_is_measured_before_the_decode_timing(model_dir, data_dir, tmp_path, monkeypatch):
    """The fast decode path may give layers extra buffers (a re-packed copy, a pair table): the
    memory and compression columns describe the quantized model as stored, not those."""
    import qtutor.bench as b

    real = b._latency

    import torch

    def latency_that_adds_a_buffer(model, prompt, args, device):
        model.register_buffer("kernel_scratch", torch.zeros(1 << 20))  # 4 MB
        return real(model, prompt, args, device)

    out_plain, out_extra = tmp_path / "plain", tmp_path / "extra"
    assert main(bench_args(model_dir, data_dir, out_plain, "--methods", "rtn_int4")) == 0
    monkeypatch.setattr(b, "_latency", latency_that_adds_a_buffer)
    assert main(bench_args(model_dir, data_dir, out_extra, "--methods", "rtn_int4")) == 0
    plain, extra = (json.loads((o / "results.json").read_text())["methods"]["rtn_int4"] for o in (out_plain, out_extra))
    assert extra["memory_mb"] == plain["memory_mb"] and extra["compression_ratio"] == plain["compression_ratio"]


def test_resume_after_killed_run(model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = bench_args(model_dir, data_dir, out, "--methods", "fp16_baseline,rtn_int8,rtn_int4", "--latency-runs", "20")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtutor", "bench", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = out / "results.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if results.exists() and json.loads(results.read_text() or "{}").get("methods"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(results.read_text())["methods"]
    assert 1 <= len(done) < 3, "the run should have been killed after its first method"
    first = next(iter(done))
    r = subprocess.run(
        [sys.executable, "-m", "qtutor", "bench", *args[:-2], "--latency-runs", "1", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert f"{first:20s} skipped" in r.stdout
    final = json.loads(results.read_text())["methods"]
    assert list(final) == ["fp16_baseline", "rtn_int8", "rtn_int4"]
    assert final[first] == done[first]  # kept, not recomputed


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "rtn_int5"], "unknown method 'rtn_int5'"),
        (["--methods", "rtn_int4", "--bits", "5"], "5-bit uniform quantization is not supported"),
        (["--methods", "rtn_int4", "--group-size", "-3"], "group size -3 is negative"),
        (["--model", "/nonexistent/model"], "model folder '/nonexistent/model' not found"),
        (["--data-dir", "/nonexistent/data"], "WikiText-2 folder '/nonexistent/data' not found"),
        (["--seqlen", "100000", "--methods", "fp16_baseline"], "exceeds the model's 256 positions"),
        (["--max-eval-tokens", "16", "--methods", "fp16_baseline"], "fewer than one window"),
    ],
)
def test_bad_input_one_line_exit_2(model_dir, data_dir, tmp_path, capsys, extra, message):
    args = bench_args(model_dir, data_dir, tmp_path / "run")
    for i in range(0, len(extra), 2):  # later flags win in argparse, but replace to keep args clean
        if extra[i] in args:
            j = args.index(extra[i])
            del args[j : j + 2]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "fp16_baseline+head"], "fp16_baseline is the unquantized reference"),
        (["--methods", "fp16_baseline", "--quantize-head"], "--quantize-head adds nothing"),
        (["--methods", "rtn_int5+head"], "unknown method 'rtn_int5'"),
        (["--methods", "rtn_int4,rtn_int4+head", "--quantize-head"], None),  # not an error: no row twice
    ],
)
def test_bad_head_requests_one_line_exit_2(extra, message):
    from qtutor.bench import parse_methods
    from qtutor.cli import bench_config

    config = bench_config(extra)
    if message is None:
        assert parse_methods(config.methods, config.quantize_head) == ["rtn_int4", "rtn_int4+head"]
        return
    with pytest.raises(qtutor.QtutorError, match=message.replace("+", r"\+")) as e:
        parse_methods(config.methods, config.quantize_head)
    assert "\n" not in str(e.value)


def test_quantize_head_adds_a_head_row_after_each_method_but_fp16():
    from qtutor.bench import parse_methods
    from qtutor.quant import implemented_methods

    rows = parse_methods("all", quantize_head=True)
    expected = []
    for n in implemented_methods():
        expected += [n] if n == "fp16_baseline" else [n, n + "+head"]
    assert rows == expected
    assert parse_methods("all") == implemented_methods()  # the default table is unchanged


def test_head_rows_end_to_end_and_by_resume(model_dir, data_dir, tmp_path, capsys):
    """--quantize-head: rtn_int4+head is a row of its own, its memory drop is the float table
    minus the packed head (from the shapes), and --resume --quantize-head adds the +head rows to
    a run made without them, keeping the others."""
    from qtutor.models import load_model

    out = tmp_path / "run"
    assert main(bench_args(model_dir, data_dir, out, "--methods", "fp16_baseline,rtn_int8", "--group-size", "32")) == 0
    before = json.loads((out / "results.json").read_text())["methods"]
    args = bench_args(
        model_dir, data_dir, out, "--methods", "fp16_baseline,rtn_int8,rtn_int4", "--group-size", "32", "--resume"
    )
    assert main(args + ["--quantize-head"]) == 0
    res = json.loads((out / "results.json").read_text())["methods"]
    assert list(res) == ["fp16_baseline", "rtn_int8", "rtn_int8+head", "rtn_int4", "rtn_int4+head"]
    assert res["rtn_int8"] == before["rtn_int8"]  # kept
    # a run with +head rows reads back (chapter 7 reads committed runs) and resumes again, all done
    assert list(qtutor.bench.load_results(out / "results.json")["methods"]) == list(res)
    assert main(args + ["--quantize-head"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == res
    assert not res["rtn_int4"]["quantize_head"] and res["rtn_int4+head"]["quantize_head"]
    assert res["rtn_int4"]["head_kernel"] is None
    assert res["rtn_int4+head"]["config"] == res["rtn_int4"]["config"]
    model, _ = load_model(str(model_dir))
    from qtutor.runtime.kernels import int8_weight_only_reason, tinygemm_reason

    for name, cfg, reason, kernel in (
        ("rtn_int4", qtutor.RTNConfig(4, 32), tinygemm_reason, "aten._weight_int4pack_mm_for_cpu"),
        ("rtn_int8", qtutor.RTNConfig(8, 32, True), int8_weight_only_reason, "aten._weight_int8pack_mm"),
    ):  # the head decodes through the CPU kernel where its shape allows it (this vocabulary may not)
        head = qtutor.quant.UniformLinear.from_float(model.lm_head, cfg)
        assert res[name + "+head"]["head_kernel"] == (kernel if reason(head, "cpu") is None else None)
    vocab, hidden = model.lm_head.weight.shape
    # rtn_int4, groups of 32, asymmetric: 4-bit codes, an fp16 scale and a 4-bit zero per group
    packed = vocab * hidden // 2 + vocab * (hidden // 32) * 2 + vocab * -(-(hidden // 32) // 2)
    for name, table in (("rtn_int4", vocab * hidden * 4), ("rtn_int8", vocab * hidden * 4)):
        plain, head = res[name]["memory_split_bytes"], res[name + "+head"]["memory_split_bytes"]
        assert plain["embeddings"] == table and plain["linears"] == head["linears"]
        if name == "rtn_int4":
            assert head["embeddings"] == packed
        assert res[name + "+head"]["compression_ratio"] > res[name]["compression_ratio"]
        assert res[name + "+head"]["memory_mb"] < res[name]["memory_mb"]
        assert res[name + "+head"]["linears"]["lm_head"]["numel"] == vocab * hidden
        assert 0 < res[name + "+head"]["linears"]["lm_head"]["weight_rel_error"] < 0.2
        assert res[name + "+head"]["ppl"] > 1
    assert "rtn_int4+head" in capsys.readouterr().out
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in csv_rows[1:]] == list(res)


def test_unreadable_results_on_resume_loses_nothing(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{not json")
    assert main(bench_args(model_dir, data_dir, out, "--methods", "fp16_baseline", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume from" in err and len(err.splitlines()) == 1
    assert (out / "results.json").read_text() == "{not json"


def test_offline_hub_id_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "qtutor", "bench", "--model", "qtutor-nonexistent/model-xyz", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    assert "cannot fetch 'qtutor-nonexistent/model-xyz'" in r.stderr and "qtutor-tiny" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "qtutor", "bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


def test_run_bench_prints_nothing_and_reports_each_method(model_dir, data_dir, tmp_path, capsys):
    """The library call: a BenchConfig in, the results out, on_result after each method, the
    command's lines only through log; the same numbers as `qtutor bench` with the same options."""
    from qtutor.bench import BenchConfig, run_bench
    from qtutor.cli import bench_config

    argv = bench_args(model_dir, data_dir, tmp_path / "cli", "--methods", "fp16_baseline", "rtn_int4")
    assert main(argv) == 0
    capsys.readouterr()
    config = bench_config(argv).replace(out=str(tmp_path / "lib"))
    assert isinstance(config, BenchConfig) and config.progress is False
    seen, lines = [], []
    results = run_bench(config, on_result=lambda name, entry: seen.append((name, entry["ppl"])), log=lines.append)
    assert capsys.readouterr().out == ""
    assert [n for n, _ in seen] == ["fp16_baseline", "rtn_int4"]
    assert any(line.startswith("rtn_int4") for line in lines)
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())["methods"]
    assert [results["methods"][n]["ppl"] for n in ("fp16_baseline", "rtn_int4")] == [
        cli[n]["ppl"] for n in ("fp16_baseline", "rtn_int4")
    ]
    with pytest.raises(qtutor.QtutorError, match="no field seq_len"):
        config.replace(seq_len=64)


def test_the_command_line_defaults_are_the_library_defaults():
    from dataclasses import fields

    from qtutor.bench import BenchConfig
    from qtutor.cli import bench_config

    assert bench_config([]).replace(progress=False, methods="all") == BenchConfig()
    assert {f.name for f in fields(BenchConfig)} >= {"seqlen", "calib_samples", "max_eval_tokens", "kernels"}


def test_overrides_reach_only_the_methods_that_declare_them():
    """--group-size 32 changes RTN/GPTQ/AWQ's groups, not palettization's 16-row palettes; --bits
    does not touch the 8-bit RTN (it declares only group_size and sym)."""
    from qtutor.bench import method_configs
    from qtutor.cli import bench_config

    configs = method_configs(
        ["rtn_int8", "rtn_int4", "gptq_int4", "awq_int4", "palettization_4bit", "qlora_nf4"],
        bench_config(["--group-size", "32", "--bits", "3"]),
    )
    assert configs["rtn_int4"].group_size == configs["gptq_int4"].group_size == configs["awq_int4"].group_size == 32
    assert configs["rtn_int4"].bits == configs["gptq_int4"].bits == configs["palettization_4bit"].bits == 3
    assert configs["rtn_int8"].bits == 8 and configs["rtn_int8"].group_size == 32
    assert configs["palettization_4bit"].group_size == 16
    assert configs["qlora_nf4"] == qtutor.get_method("qlora_nf4").default_config


@pytest.mark.parametrize(
    "flags, act_order, static_groups",
    [
        (["--no-act-order", "--no-static-groups"], False, False),  # the 2022 reference's column order
        (["--act-order", "--no-static-groups"], True, False),  # act-order with a g_idx
    ],
)
def test_gptq_column_order_flags_reach_gptq_only(flags, act_order, static_groups):
    from qtutor.bench import method_configs
    from qtutor.cli import bench_config

    configs = method_configs(["gptq_int4", "awq_int4", "rtn_int4"], bench_config(flags))
    assert (configs["gptq_int4"].act_order, configs["gptq_int4"].static_groups) == (act_order, static_groups)
    assert configs["awq_int4"] == qtutor.get_method("awq_int4").default_config
    assert configs["rtn_int4"] == qtutor.get_method("rtn_int4").default_config


def test_hf_generate_rows_time_the_float_model_and_a_failure_loses_nothing(model_dir, data_dir, tmp_path, monkeypatch):
    """--hf-generate: what a user would run instead (generate, static cache; --no-hf-compile
    leaves the compiled entry out, its compilation takes a minute on a CPU), timed in the same
    run and drawn on the latency figure; a failing entry is recorded and the methods' results stay."""
    import qtutor.eval.latency

    argv = bench_args(model_dir, data_dir, tmp_path / "a", "--methods", "fp16_baseline", "--hf-generate")
    assert main(argv + ["--no-hf-compile"]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert list(res["alternatives"]) == ["hf-generate-static"]
    alt = res["alternatives"]["hf-generate-static"]
    assert alt["status"] == "ok" and alt["latency_ms_per_token"] > 0 and len(alt["latency_runs_ms_per_token"]) >= 1

    def broken(*args, **kwargs):
        raise RuntimeError("compiler missing\nsecond line")

    monkeypatch.setattr(qtutor.eval.latency, "hf_generate_latency", broken)
    argv = bench_args(model_dir, data_dir, tmp_path / "b", "--methods", "fp16_baseline", "--hf-generate")
    assert main(argv) == 0  # both entries (--hf-compile is the default), both failing
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["alternatives"]["hf-generate-static"]["status"] == "failed: RuntimeError: compiler missing"
    assert res["alternatives"]["hf-generate-static-compile"]["status"] == "failed: RuntimeError: compiler missing"
    assert res["methods"]["fp16_baseline"]["ppl"] > 0


def test_no_hf_generate_rows_on_a_cpu_by_default(model_dir, data_dir, tmp_path):
    assert main(bench_args(model_dir, data_dir, tmp_path, "--methods", "fp16_baseline")) == 0
    assert "alternatives" not in json.loads((tmp_path / "results.json").read_text())
