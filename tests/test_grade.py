"""``qtutor grade``: finds the exercises and their checkers, executes tiny synthetic notebooks
(one right answer, one wrong, one unanswered, a cell that raises, a kernel that dies) and writes
the scores; bad input is a one-line error. The real chapters are not run here: README.md gives
the command that grades a chapter of the student edition."""

import json

import pytest

from qtutor.cli import main
from qtutor.grade import find_exercises

nbformat = pytest.importorskip("nbformat")


def _exercise(label: str, text: str = "Write it.") -> str:
    return f"```{{exercise}} A title\n:label: {label}\n\n{text}\n```"


def _notebook(*cells) -> "nbformat.NotebookNode":
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


STUDENT = _notebook(
    ("code", "from qtutor.checks import ch00, ch07"),
    ("md", _exercise("ex-right")),
    (
        "code",
        "def decode_speedup(linear_bytes_fp16, other_bytes, bits_per_weight):\n"
        "    return (linear_bytes_fp16 + other_bytes) / (linear_bytes_fp16 * bits_per_weight / 16 + other_bytes)",
    ),
    ("code", "ch07.check_decode_speedup(decode_speedup);"),
    ("md", _exercise("ex-wrong")),
    ("code", "def pareto(points):\n    return list(points)  # every method: wrong"),
    ("code", "print('a cell that raises next')\n1 / 0"),
    ("code", "if ch07.check_pareto(pareto):\n    print('on the front')"),
    ("md", _exercise("ex-unanswered")),
    ("code", "def scored_tokens(n_tokens, seqlen):\n    ...  # your code"),
    ("code", "ch00.check_scored_tokens(scored_tokens);"),
    ("md", _exercise("ex-no-checker", "Predict, then run.")),
)


def test_find_exercises_pairs_each_label_with_the_next_checker_call():
    found = {ex.label: (ex.module, ex.checker, ex.call) for ex in find_exercises(STUDENT)}
    assert found == {
        "ex-right": ("ch07", "check_decode_speedup", "ch07.check_decode_speedup(decode_speedup)"),
        "ex-wrong": ("ch07", "check_pareto", "ch07.check_pareto(pareto)"),
        "ex-unanswered": ("ch00", "check_scored_tokens", "ch00.check_scored_tokens(scored_tokens)"),
        "ex-no-checker": (None, None, None),
    }


def test_find_exercises_on_a_chapter_finds_every_labelled_exercise():
    from pathlib import Path

    nb = nbformat.read(Path(__file__).parent.parent / "chapters" / "02_smoothquant.ipynb", as_version=4)
    exercises = find_exercises(nb)
    labels = [ex.label for ex in exercises]
    assert {"ex-ch02-per-token", "ex-ch02-up-down", "ex-ch02-alpha"} <= set(labels)
    by_label = {ex.label: ex for ex in exercises}
    assert by_label["ex-ch02-per-token"].call == "ch02.check_per_token_quant(quantize_per_token)"
    assert by_label["ex-ch02-alpha"].call == "ch02.check_alpha_search(alpha_search)"  # inside an `if`


def _grade(tmp_path, *args, timeout=120):
    out = tmp_path / "scores.json"
    rc = main(["grade", *map(str, args), "--out", str(out), "--timeout", str(timeout)])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_grade_scores_a_notebook_and_records_errors(tmp_path, capsys):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = tmp_path / "alice.ipynb"
    nbformat.write(STUDENT, path)
    rc, scores = _grade(tmp_path, path)
    assert rc == 0
    assert scores["qtutor_grade"] == 1
    (record,) = scores["notebooks"].values()
    assert record["status"] == "graded" and record["error"] is None
    assert (record["score"], record["max_score"]) == (1, 4)
    ex = record["exercises"]
    assert ex["ex-right"]["passed"] is True and ex["ex-right"]["score"] == 1
    assert ex["ex-right"]["message"].startswith("correct: memory-bound decode speed-up")
    assert ex["ex-right"]["checker"] == "ch07.check_decode_speedup"
    assert ex["ex-wrong"]["passed"] is False and ex["ex-wrong"]["score"] == 0
    assert ex["ex-wrong"]["message"].startswith("not yet: front") and "dominated" in ex["ex-wrong"]["message"]
    assert ex["ex-unanswered"]["passed"] is False
    assert "returned None" in ex["ex-unanswered"]["message"]
    assert ex["ex-no-checker"]["passed"] is False and "no qtutor.checks call" in ex["ex-no-checker"]["message"]
    assert record["cell_errors"] == [{"cell": 6, "error": "ZeroDivisionError: division by zero"}]
    assert "1/4 exercises passed" in capsys.readouterr().out


def test_a_notebook_whose_kernel_dies_is_recorded_and_the_others_are_graded(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    folder = tmp_path / "class"
    folder.mkdir()
    nbformat.write(STUDENT, folder / "a_alice.ipynb")
    dying = _notebook(
        ("md", _exercise("ex-right")),
        ("code", "import time\ntime.sleep(600)  # runs over the timeout: interrupted, recorded"),
        ("code", "import os\nos._exit(1)"),
        ("code", "ch07.check_decode_speedup(decode_speedup)"),
    )
    nbformat.write(dying, folder / "b_bob.ipynb")
    rc, scores = _grade(tmp_path, folder, timeout=30)
    assert rc == 1  # one notebook could not be executed to the end
    alice, bob = (scores["notebooks"][k] for k in sorted(scores["notebooks"]))
    assert bob["cell_errors"][0] == {"cell": 1, "error": "Timeout: the cell ran over 30 s and was interrupted"}
    assert alice["status"] == "graded" and alice["score"] == 1
    assert bob["status"] == "error" and bob["error"]
    assert bob["exercises"]["ex-right"]["passed"] is False
    assert "did not run to the end" in bob["exercises"]["ex-right"]["message"]


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda d: d / "missing.ipynb", "no such file or folder"),
        (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "is not a notebook"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no notebooks"),
        (lambda d: (d / "broken.ipynb").write_text("{not json") and d / "broken.ipynb", "not a readable notebook"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, fragment):
    rc, scores = _grade(tmp_path, make(tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and scores is None
    assert err.startswith("qtutor grade: error:") and fragment in err and "\n" not in err


def test_grade_needs_out_and_names_the_commands(capsys):
    assert main(["grade", "x.ipynb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "\n" not in err
    assert main(["grades"]) == 2
    assert "'qtutor grade'" in capsys.readouterr().err
