"""scripts/rehearse.py: runs notebooks in a fresh kernel and records status, time, peaks, first error."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def notebook(path: Path, *sources: str) -> None:
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": s}
        for i, s in enumerate(sources)
    ]
    path.write_text(
        json.dumps(
            {
                "cells": cells,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )


def test_rehearsal_records_ok_and_first_error(tmp_path):
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    notebook(
        chapters / "00_ok.ipynb", "import os\nassert os.environ['QTUTOR_MODEL'] == 'some-model'", "x = [0] * 10**6"
    )
    notebook(chapters / "01_bad.ipynb", "y = 1", "raise ValueError('broken on purpose')", "z = 2")
    out = tmp_path / "rehearsal"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "rehearse.py"),
            "--device",
            "cpu",
            "--model",
            "some-model",
            "--chapters-dir",
            str(chapters),
            "--out",
            str(out),
            "--label",
            "test",
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 1, r.stdout + r.stderr  # one chapter failed
    rows = {row["chapter"]: row for row in csv.DictReader(open(out.with_suffix(".csv")))}
    assert rows["00_ok"]["status"] == "ok" and rows["00_ok"]["error"] == ""
    assert float(rows["00_ok"]["host_peak_gib"]) > 0.01  # read inside the kernel
    assert rows["01_bad"]["status"] == "error"
    assert rows["01_bad"]["error"].startswith("cell 1: ValueError: broken on purpose")
    assert rows["00_ok"]["run"] == "test"
    assert "| 01_bad | test | error |" in out.with_suffix(".md").read_text()


def test_t4_table_scales_measured_times(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import rehearse

    p = tmp_path / "r.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=rehearse.FIELDS)
        w.writeheader()
        w.writerow({"chapter": "00_a", "status": "ok", "wall_s": 60, "gpu_reserved_peak_gib": 2.0})
        w.writerow({"chapter": "01_b", "status": "error", "wall_s": 5})
    table = rehearse.t4_table(p)
    assert f"| 00_a | 60 | {60 * rehearse.T4_SLOWDOWN / 60:.0f} | 2.0 |" in table
    assert "| 01_b | error | - | - |" in table


def test_committed_h200_rehearsal_matches_the_book():
    """book/how-to-read-and-run.md shows exactly the table derived from the committed CSV."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import rehearse

    csv_path = ROOT / "benchmarks" / "rehearsal_qwen2-0.5b_h200.csv"
    page = (ROOT / "book" / "how-to-read-and-run.md").read_text()
    assert rehearse.t4_table(csv_path) in page


def test_committed_cpu_rehearsal_matches_the_book():
    sys.path.insert(0, str(ROOT / "scripts"))
    import rehearse

    page = (ROOT / "book" / "how-to-read-and-run.md").read_text()
    assert rehearse.cpu_table(ROOT / "benchmarks" / "rehearsal_qwen2-0.5b_cpu.csv") in page


def test_gpu_run_script_keeps_to_its_budget(tmp_path):
    """benchmarks/gpu_run.sh runs a step only while its budget leaves room for it, says why it
    skips one, names an unknown step, and always ends (exit 0) with its log in OUT."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "BUDGET": "5", "STEPS": "tests gptq bench gemv rehearsal typo"}
    env.pop("DATA_DIR", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "gpu_run.log").read_text()
    for step in ("tests", "gptq", "bench", "gemv", "rehearsal"):
        assert f"skip {step}:" in log
    assert "unknown step typo" in log and "DATA_DIR" in log and log.rstrip().endswith("done")
    assert not (tmp_path / "bench.log").exists()  # nothing started
    # with time for it, a step runs, its log and output land in OUT (GPTQ's loops, tiny shapes, CPU)
    out = tmp_path / "run"
    env.update(OUT=str(out), BUDGET="300", STEPS="gptq", CONFIG="tiny")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = (out / "gpu_run.log").read_text()
    assert "start gptq" in log and "end gptq: exit 0" in log
    assert len(list(csv.DictReader(open(out / "gptq_speed_tiny.csv")))) == 3
