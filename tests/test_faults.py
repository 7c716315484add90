"""Bad input and faults against ``qtutor bench`` and the Python API (issue #14).

Every case must end in one line that says what was wrong and what to do, exit code 2, no
traceback, and nothing already computed lost. The invariant of the results folder (a finished
method's result is never lost or overwritten, whatever runs after it, fails, is killed or runs
at the same time) is checked case by case and, at the end, on random sequences of runs, kills,
resumes, full disks and concurrent attempts on one folder.

The runs use the embedded model on a 20,000-character slice of its texts, without figures
(neither matters to what is tested here), so that each takes about a second.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qtutor
from conftest import tiny_model
from qtutor import QtutorError
from qtutor.cli import bench_main as main
from qtutor.models import embedded_model_dir
from qtutor.quant import AWQConfig, GPTQConfig, NF4Config, PalettizeConfig, RTNConfig, SmoothQuantConfig
from qtutor.runfolder import LOCK, finite_or_none, locked, read_results

ARGS = [
    "--dataset",
    "embedded",
    "--seqlen",
    "32",
    "--max-eval-tokens",
    "64",
    "--calib-samples",
    "2",
    "--latency-tokens",
    "2",
    "--latency-runs",
    "1",
    "--no-progress",
]
CHEAP = "fp16_baseline,rtn_int4"
#: the numbers of a method entry that do not depend on timing
EXACT = (
    "ppl",
    "eval_tokens",
    "seqlen",
    "bits_per_weight",
    "memory_mb",
    "compression_ratio",
    "memory_split_bytes",
    "config",
)


def _quick(mp):
    """Short texts and no figures (the figures are tested in test_bench.py)."""
    import qtutor.data as data

    full = data.embedded_text
    mp.setattr(data, "embedded_text", lambda part="heldout": full(part)[:20_000])
    mp.setattr("qtutor.plots.plot_results", lambda results, out: [])


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    _quick(monkeypatch)


def bench(out, *extra, methods=CHEAP):
    return main([*ARGS, "--methods", methods, "--out", str(out), *extra])


def one_line_error(capsys, *fragments):
    """The captured stderr is one line holding every fragment, and no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qtutor bench: error: "), err
    for f in fragments:
        assert f in err, err
    return err


def snapshot(folder: Path) -> dict:
    """Every file of ``folder`` (but the lock file) -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK} if folder.exists() else {}


def methods(folder: Path, name="results.json") -> dict:
    return json.loads((folder / name).read_text())["methods"]


def exact(entry: dict) -> dict:
    return {k: entry[k] for k in EXACT}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder where fp16_baseline, rtn_int4 and smoothquant_w8a8 (calibrated) are finished."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _quick(mp)
        assert bench(out, methods="fp16_baseline,rtn_int4,smoothquant_w8a8") == 0
    return out


@pytest.fixture
def done(finished, tmp_path):
    """A private copy of ``finished``."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# --------------------------------------------------------------------------- bad options
BAD_OPTIONS = [
    (["--seqlen", "1"], "--seqlen 1 is too small"),
    (["--seqlen", "-5"], "--seqlen -5 is too small"),
    (["--seqlen", "0"], "--seqlen 0 is too small"),  # 0 no longer means "the default"
    (["--calib-samples", "-1"], "--calib-samples -1 is too small"),
    (["--calib-samples", "0"], "--calib-samples 0 is too small"),
    (["--calib-seqlen", "-3"], "--calib-seqlen -3 is too small"),
    (["--calib-seqlen", "0"], "--calib-seqlen 0 is too small"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0 is too small"),
    (["--latency-runs", "0"], "--latency-runs 0 is too small"),
    (["--latency-tokens", "0"], "--latency-tokens 0 is too small"),
    (["--latency-tokens", "1"], "decoding speed needs two"),
    (["--max-eval-tokens", "0"], "--max-eval-tokens 0 is too small"),
    (["--max-eval-tokens", "16"], "use --max-eval-tokens 32 or more, or a smaller --seqlen"),
    (["--seed", "-1"], "--seed -1 is too small"),
    (["--seqlen", "abc"], "invalid int value: 'abc'"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--methods", "rtn_int4,fp16_baseline,rtn_int4"], "--methods names rtn_int4 more than once"),
    (["--group-size", "-3"], "group size -3 is negative"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--random-weights", "--model", "/nonexistent/model"], "model folder '/nonexistent/model' not found"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "no CUDA device is available"))


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_option_one_line_and_results_untouched(done, capsys, extra, message):
    """Refused before any work: the finished results are byte for byte as they were."""
    before = snapshot(done)
    assert bench(done, *extra) == 2
    one_line_error(capsys, message)
    assert snapshot(done) == before


def test_bad_option_creates_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert bench(out, "--seqlen", "1") == 2
    one_line_error(capsys, "--seqlen 1")
    assert not out.parent.exists()


# --------------------------------------------------------------------------- the output folder
def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert bench(tmp_path / "f") == 2
    one_line_error(capsys, "is a file, not a folder")
    assert (tmp_path / "f").read_text() == "mine"


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert bench(tmp_path / "f" / "run") == 2
    one_line_error(capsys, "lies under", "which is a file")


def test_out_not_writable(tmp_path, capsys, monkeypatch):
    """As root every folder is writable, so the refusal of the operating system is simulated."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert bench(tmp_path / "run") == 2
    one_line_error(capsys, "is not writable", "another --out")


def test_out_permission_denied_while_creating(tmp_path, capsys, monkeypatch):
    def refuse(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert bench(tmp_path / "run") == 2
    one_line_error(capsys, "Permission denied", "make it writable or use another --out")


def fail_fsync_on(call: int, monkeypatch):
    """Make the ``call``-th file flush (1-based) fail as on a full disk."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_mid_run_keeps_finished_methods(tmp_path, capsys, monkeypatch):
    """Writes: 1 the empty file, 2 after fp16_baseline, 3 after rtn_int4: the third fails."""
    out = tmp_path / "run"
    fail_fsync_on(3, monkeypatch)
    assert bench(out) == 2
    one_line_error(capsys, "No space left on device", "free some disk space")
    assert list(methods(out)) == ["fp16_baseline"]
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"
    monkeypatch.undo()
    _quick(monkeypatch)
    assert bench(out, "--resume") == 0  # and the run continues where it stopped
    assert list(methods(out)) == ["fp16_baseline", "rtn_int4"]


def test_disk_full_while_writing_the_table(tmp_path, capsys, monkeypatch):
    """results.json is complete before results.csv is written; a failure there says so."""

    def full(results, path):
        Path(path).write_text("method,pp")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qtutor.plots.write_csv", full)
    out = tmp_path / "run"
    assert bench(out) == 2
    one_line_error(capsys, "results.json is complete", "No space left on device")
    assert list(methods(out)) == ["fp16_baseline", "rtn_int4"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "results.json"]


def test_stale_temporary_of_a_killed_run_is_removed(done):
    (done / "results.json.abc123.tmp").write_text("{half")
    assert bench(done, "--resume") == 0
    assert not list(done.glob("*.tmp"))


# --------------------------------------------------------------------------- results safety
def test_fresh_run_over_finished_methods_is_refused(done, capsys):
    before = snapshot(done)
    assert bench(done) == 2
    one_line_error(capsys, "holds 3 finished methods", "--resume", "--overwrite")
    assert snapshot(done) == before


def test_overwrite_keeps_every_earlier_file(done, capsys):
    """--overwrite twice: two archives, the first never replaced by the second."""
    original = (done / "results.json").read_bytes()
    assert bench(done, "--overwrite", methods="fp16_baseline") == 0
    assert (done / "results.previous-1.json").read_bytes() == original
    second = (done / "results.json").read_bytes()
    assert bench(done, "--overwrite", methods="fp16_baseline") == 0
    assert (done / "results.previous-1.json").read_bytes() == original
    assert (done / "results.previous-2.json").read_bytes() == second


class Killed(KeyboardInterrupt):
    pass


def kill_after(k: int, monkeypatch):
    """The run is interrupted when it starts its (k+1)-th method, as Ctrl-C or a kill would."""
    import qtutor.bench as b

    real, calls = b.measure, []

    def measure(*a, **kw):
        calls.append(1)
        if len(calls) > k:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(b, "measure", measure)


def test_failed_overwrite_then_retry_loses_nothing(done, monkeypatch):
    """The old way lost finished methods here: a failed run, retried, replaced the backup."""
    original = methods(done)
    kill_after(0, monkeypatch)
    assert bench(done, "--overwrite") == 130
    assert bench(done, "--overwrite") == 130
    assert methods(done, "results.previous-1.json") == original
    assert methods(done, "results.previous-2.json") == {}


def test_interrupted_run_keeps_its_methods_and_releases_the_lock(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    kill_after(1, monkeypatch)
    assert bench(out) == 130
    assert "finished methods are kept" in capsys.readouterr().err
    assert list(methods(out)) == ["fp16_baseline"]
    with locked(out):  # not left locked
        pass


def test_a_second_run_in_this_process_is_refused(done, capsys):
    before = snapshot(done)
    with locked(done):
        assert bench(done, "--resume", methods="fp16_baseline,rtn_int8") == 2
    one_line_error(capsys, "another qtutor bench", f"(pid {os.getpid()})", "another --out")
    assert snapshot(done) == before


def test_a_second_process_is_refused(done):
    """The real command in another process, while this one holds the folder."""
    before = snapshot(done)
    with locked(done):
        r = subprocess.run(
            [sys.executable, "-m", "qtutor", "bench", *ARGS, "--methods", "rtn_int8", "--resume", "--out", str(done)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "another qtutor bench" in r.stderr
    assert snapshot(done) == before


def test_unexpected_failure_keeps_finished_methods(tmp_path, monkeypatch):
    """A crash inside a method (a bug, say) still leaves the methods before it."""
    import qtutor.bench as b

    real = b.measure

    def measure(args, plan, inputs, name, fp16_bytes, keep=None):
        if name == "rtn_int4":
            raise RuntimeError("boom")
        return real(args, plan, inputs, name, fp16_bytes, keep)

    monkeypatch.setattr(b, "measure", measure)
    with pytest.raises(RuntimeError, match="boom"):
        bench(tmp_path / "run")
    assert list(methods(tmp_path / "run")) == ["fp16_baseline"]


# --------------------------------------------------------------------------- --resume
RESUME_CHANGES = [
    (["--group-size", "64"], "--group-size = unset, this run has 64"),
    (["--bits", "8"], "--bits"),
    (["--no-sym"], "--sym/--no-sym"),
    (["--max-eval-tokens", "96"], "the evaluated tokens (--max-eval-tokens) = 64, this run has 96"),
    (["--seqlen", "16"], "--seqlen = 32, this run has 16"),
    (["--seed", "1"], "--seed = 0, this run has 1"),
    (["--dtype", "bfloat16"], "--dtype = 'float32', this run has 'bfloat16'"),
    (["--calib-samples", "3"], "--calib-samples = 2, this run has 3"),
    (["--calib-seqlen", "16"], "--calib-seqlen = 32, this run has 16"),
    (["--latency-tokens", "3"], "--latency-tokens"),
    (["--kernels", "none"], "--kernels"),
]


@pytest.mark.parametrize("extra,message", RESUME_CHANGES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_resume_refuses_another_setting(done, capsys, extra, message):
    before = snapshot(done)
    assert bench(done, "--resume", *extra, methods="smoothquant_w8a8,rtn_int8") == 2
    one_line_error(capsys, "cannot resume", message)
    assert snapshot(done) == before


def test_resume_refuses_another_model_revision(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(embedded_model_dir(), model)
    out = tmp_path / "run"
    assert bench(out, "--model", str(model), methods="fp16_baseline") == 0
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01  # retrained, say
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert bench(out, "--model", str(model), "--resume") == 2
    one_line_error(capsys, "the model's files (config and weights)")
    assert list(methods(out)) == ["fp16_baseline"]


def test_resume_refuses_a_method_config_that_differs(done, capsys):
    data = json.loads((done / "results.json").read_text())
    data["methods"]["rtn_int4"]["config"]["group_size"] = 64  # an older default, say
    (done / "results.json").write_text(json.dumps(data))
    assert bench(done, "--resume") == 2
    one_line_error(capsys, "rtn_int4", "another config (group_size differ)")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("device_type", "cuda", "--device = 'cuda', this run has 'cpu'"),
        ("dataset", "wikitext2", "--dataset = 'wikitext2', this run has 'embedded'"),
        ("eval_text", "sha256:0", "the evaluation text (--data-dir or the tokenizer)"),
        ("calib_windows", "sha256:0", "the calibration text"),
    ],
)
def test_resume_refuses_what_options_alone_cannot_change_here(done, capsys, key, value, message):
    """Settings this machine cannot reproduce from options (a GPU, another text) edited in."""
    data = json.loads((done / "results.json").read_text())
    data["settings"][key] = value
    (done / "results.json").write_text(json.dumps(data))
    assert bench(done, "--resume", methods="smoothquant_w8a8") == 2
    one_line_error(capsys, "cannot resume", message)


def test_resume_refuses_a_file_without_settings(done, capsys):
    data = json.loads((done / "results.json").read_text())
    del data["settings"]
    (done / "results.json").write_text(json.dumps(data))
    assert bench(done, "--resume") == 2
    one_line_error(capsys, "does not record its settings")


def test_resume_with_the_same_settings_adds_and_keeps(done, finished):
    """Only a timing knob differs (--latency-runs): allowed; earlier entries are kept as they were."""
    assert bench(done, "--resume", "--latency-runs", "2", methods="fp16_baseline,rtn_int8") == 0
    now, before = methods(done), methods(finished)
    assert list(now) == ["fp16_baseline", "rtn_int4", "smoothquant_w8a8", "rtn_int8"]
    assert all(now[n] == before[n] for n in before)


def test_resume_without_calibration_then_with_records_it(tmp_path):
    """A folder started by uncalibrated methods takes the calibration of the first run that has one."""
    out = tmp_path / "run"
    assert bench(out, methods="fp16_baseline") == 0
    assert bench(out, "--resume", methods="smoothquant_w8a8") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["calib_samples"] == 2 and res["settings"]["calib_samples"] == 2
    assert bench(out, "--resume", "--calib-samples", "3", methods="smoothquant_w8a8") == 2


CORRUPT = [
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('{"methods": []}', "no 'methods' object"),
    ('{"methods": {"rtn_int4": {"ppl": 5.0}}}', "method 'rtn_int4' lacks eval_tokens"),
    ('{"methods": {"rtn_int4": [1]}}', "method 'rtn_int4' is a JSON list"),
    ('{"methods": {"rtn_int9": {}}}', "unknown method 'rtn_int9'"),
    ('{"methods": {}, "x": NaN}', "NaN is not strict JSON"),
    (
        '{"methods": {"rtn_int4": {"ppl": "5", "eval_tokens": 1, "seqlen": 1, "bits_per_weight": 4, '
        '"memory_mb": 1, "compression_ratio": 1, "latency_ms_per_token": 1, "quant_seconds": 1, '
        '"config": null}}}',
        "has ppl='5', not a number",
    ),
]


@pytest.mark.parametrize("text,message", CORRUPT, ids=[m for _, m in CORRUPT])
def test_resume_from_a_bad_file(tmp_path, capsys, text, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(text)
    assert bench(out, "--resume") == 2
    one_line_error(capsys, "cannot resume from", message)
    assert (out / "results.json").read_text() == text


def test_fresh_run_over_an_unreadable_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("[1, 2]")
    assert bench(out) == 2
    one_line_error(capsys, "not a readable results file", "--overwrite")
    assert (out / "results.json").read_text() == "[1, 2]"


# --------------------------------------------------------------------------- model files
@pytest.fixture
def model_copy(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(embedded_model_dir(), d)
    return d


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_at_load(model_copy, tmp_path, capsys, value):
    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert bench(tmp_path / "run", "--model", str(model_copy)) == 2
    one_line_error(capsys, "model.layers.1.mlp.down_proj.weight", "holds 1 NaN/Inf values")
    assert not (tmp_path / "run" / "results.json").exists()


def test_truncated_safetensors(model_copy, tmp_path, capsys):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert bench(tmp_path / "run", "--model", str(model_copy)) == 2
    one_line_error(capsys, "are damaged", "copy or download the model again")


def test_non_finite_result_is_null_in_strict_json(tmp_path, capsys, monkeypatch):
    """An overflowing evaluation (forced here) is reported and recorded as null, never as NaN."""
    import qtutor.eval as ev

    real = ev.perplexity

    def inf_ppl(*a, **k):
        r = real(*a, **k)
        r.ppl = float("inf")
        return r

    monkeypatch.setattr(ev, "perplexity", inf_ppl)
    out = tmp_path / "run"
    assert bench(out, methods="rtn_int4") == 0
    assert "warning: rtn_int4: ppl = inf is not a finite number" in capsys.readouterr().out
    assert read_results(out / "results.json")["methods"]["rtn_int4"]["ppl"] is None  # strict parse
    assert "rtn_int4,," in (out / "results.csv").read_text()


def test_finite_or_none_replaces_every_non_finite_float():
    data, where = finite_or_none({"a": float("nan"), "b": [1.0, float("-inf")], "c": {"d": 2}})
    assert data == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    assert where == ["a = nan", "b[1] = -inf"]


# --------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def float_model():
    return tiny_model("qwen2")


def api_error(fn, *fragments):
    with pytest.raises(QtutorError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "call,fragments",
    [
        (lambda m: qtutor.quantize(None, "rtn_int4"), ("needs a causal LM", "got NoneType")),
        (lambda m: qtutor.quantize(torch.nn.Linear(4, 4), "rtn_int4"), ("needs a causal LM",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB.float()), ("holds float32 values",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB[0]), ("has shape (16,)",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB[:0]), ("has shape (0, 16)",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB.tolist()), ("is a list, not a tensor",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB + 1000), ("outside the model's vocabulary of 128",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB - 1000), ("outside the model's vocabulary",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB, device="gpu"), ("unknown device 'gpu'",)),
        (lambda m: qtutor.quantize(m, "gptq_int4", calib=CALIB, device="mps"), ("'mps' is not supported",)),
        (lambda m: qtutor.quantize(m, "rtn_int4", RTNConfig(bits=8)), ()),  # fine: control case
    ],
    ids=[
        "None",
        "not-a-LM",
        "float-calib",
        "1d-calib",
        "empty-calib",
        "list-calib",
        "ids-too-large",
        "negative-ids",
        "gpu",
        "mps",
        "control",
    ],
)
def test_quantize_checks_its_inputs(float_model, call, fragments):
    import copy

    model = copy.deepcopy(float_model)
    if not fragments:
        call(model)
        return
    weights = [p.clone() for p in model.parameters()]
    api_error(lambda: call(model), *fragments)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True)), "changed"


def test_quantize_refuses_a_quantized_model(float_model):
    import copy

    model = copy.deepcopy(float_model)
    qtutor.quantize(model, "rtn_int4")
    api_error(
        lambda: qtutor.quantize(model, "rtn_int8"), "already quantized", "layers.0.self_attn.q_proj", "fresh float copy"
    )


def test_quantize_refuses_non_finite_weights(float_model):
    import copy

    model = copy.deepcopy(float_model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    api_error(lambda: qtutor.quantize(model, "rtn_int4"), "layers.1.mlp.up_proj.weight holds 1 NaN/Inf")


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: GPTQConfig(group_size=2.5), "group_size must be an integer, e.g. group_size=128"),
        (lambda: RTNConfig(bits=4.0), "bits must be an integer"),
        (lambda: RTNConfig(sym="no"), "sym must be True or False"),
        (lambda: AWQConfig(max_shrink="0.5"), "max_shrink must be a finite number"),
        (lambda: NF4Config(block_size=64.0), "block_size must be an integer"),
        (lambda: SmoothQuantConfig(alpha=float("nan")), "alpha must be a finite number"),
        (lambda: PalettizeConfig(bits=True), "bits must be an integer"),
        (lambda: GPTQConfig(act_order=1), "act_order must be True or False"),
        (lambda: RTNConfig().replace(group_size="64"), "group_size must be an integer"),
    ],
)
def test_config_fields_are_type_checked(make, fragment):
    api_error(make, fragment)


def test_config_accepts_numpy_integers_as_ints():
    import numpy as np

    cfg = RTNConfig(bits=np.int64(8), group_size=np.int32(0))
    assert type(cfg.bits) is int and type(cfg.group_size) is int
    assert json.dumps(cfg.__dict__) == '{"bits": 8, "group_size": 0, "sym": false}'


# --------------------------------------------------------------------------- random sequences
POOL = ("fp16_baseline", "rtn_int8", "rtn_int4")


def every_entry(folder: Path) -> set:
    """(file-independent) every method entry of every results file in ``folder``."""
    found = set()
    for f in folder.glob("results*.json"):
        for name, entry in read_results(f)["methods"].items():
            found.add((name, json.dumps(entry, sort_keys=True)))
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        _quick(mp)
        assert bench(out, methods=",".join(POOL)) == 0
    return {n: exact(e) for n, e in methods(out).items()}


def random_step(rng: random.Random, out: Path, monkeypatch) -> str:
    """One of: a fresh run, --overwrite, --resume, a killed resume, a resume on a full disk, a
    run while another holds the folder. Returns what was done, and checks its exit code."""
    names = ",".join(rng.sample(POOL, rng.randint(1, len(POOL))))
    op = rng.choice(("fresh", "overwrite", "resume", "kill", "disk-full", "concurrent"))
    has_methods = (out / "results.json").exists() and bool(methods(out))
    with monkeypatch.context() as mp:
        if op == "fresh":
            assert bench(out, methods=names) == (2 if has_methods else 0)
        elif op == "overwrite":
            assert bench(out, "--overwrite", methods=names) == 0
        elif op == "resume":
            assert bench(out, "--resume", methods=names) == 0
        elif op == "kill":
            kill_after(rng.randint(0, 2), mp)
            assert bench(out, "--resume", methods=names) in (0, 130)
        elif op == "disk-full":
            fail_fsync_on(rng.randint(1, 4), mp)
            assert bench(out, "--resume", methods=names) in (0, 2)
        else:
            with locked(out):
                assert bench(out, "--resume", methods=names) == 2
    return f"{op} {names}"


@pytest.mark.parametrize("seed", [1, 3, 5])  # between them: every kind of step
def test_random_runs_kills_and_resumes_lose_nothing(seed, tmp_path, monkeypatch, uninterrupted, capsys):
    """After every step, every method entry ever seen is still in some results file, unchanged;
    at the end a resumed run's numbers equal an uninterrupted run's, bit for bit."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    seen: set = set()
    history = []
    for _ in range(6):
        history.append(random_step(rng, out, monkeypatch))
        now = every_entry(out) if out.exists() else set()
        assert seen <= now, f"lost a finished method after {history}"
        seen |= now
        assert not list(out.glob("*.tmp")) if out.exists() else True
    assert bench(out, "--resume", methods=",".join(POOL)) == 0
    final = methods(out)
    assert {n: exact(final[n]) for n in POOL} == uninterrupted, history
    capsys.readouterr()
