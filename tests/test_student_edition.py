"""The student edition committed under student/ is the one scripts/student_edition.py writes
from chapters/ (the check CI runs), shows no solution, keeps every exercise with its checker
call, and its Colab badges open the student notebooks; the chapters' badges point to it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qtutor.grade import find_exercises

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "student_edition.py"
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def _nb(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _text(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def test_the_committed_edition_is_up_to_date():
    result = _run("chapters", "student", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is the edition of chapters" in result.stdout


def test_check_names_a_stale_a_missing_and_an_extra_notebook(tmp_path):
    out = tmp_path / "student"
    shutil.copytree(ROOT / "student", out)
    stale = out / CHAPTERS[0].name
    nb = _nb(stale)
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": ["an edit by hand"]})
    stale.write_text(json.dumps(nb), encoding="utf-8")
    (out / CHAPTERS[1].name).unlink()
    (out / "99_extra.ipynb").write_text("{}", encoding="utf-8")
    result = _run("chapters", out, "--check")
    assert result.returncode == 1
    line = result.stdout.strip()
    assert CHAPTERS[0].name in line and CHAPTERS[1].name in line and "99_extra.ipynb without a chapter" in line
    assert "run python scripts/student_edition.py" in line


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_solution_is_visible_and_every_exercise_stays(chapter):
    full, student = _nb(chapter), _nb(ROOT / "student" / chapter.name)
    text = "\n".join(_text(c) for c in student["cells"])
    assert "{solution" not in text
    assert not any("solution" in c.get("metadata", {}).get("tags", []) for c in student["cells"])
    # no line of a solution cell's code is left, except those the chapter's own code shares
    # (an exercise may extend a function the chapter wrote out)
    solutions = [c for c in full["cells"] if "solution" in c.get("metadata", {}).get("tags", [])]
    shown = "\n".join(_text(c) for c in full["cells"] if c["cell_type"] == "code" and c not in solutions)
    for cell in solutions:
        body = _text(cell).split("\n")[1:]  # the first line names the solution
        own = [line.strip() for line in body if len(line.strip()) > 25 and line.strip() not in shown]
        if own:
            assert not any(line in text for line in own), own
        else:  # a short answer (a number written down): its code must not be left as a whole
            answer = "\n".join(line for line in body if line.strip()).strip() or _text(cell).strip()
            assert answer and answer not in text, answer
    assert all(not c.get("outputs") for c in student["cells"] if c["cell_type"] == "code")
    calls = lambda nb: [(ex.label, ex.call) for ex in find_exercises(nb)]  # noqa: E731
    assert calls(student) == calls(full) and all(call for _, call in calls(student))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_badges_open_the_student_edition(chapter):
    colab = "https://colab.research.google.com/github/qtutor/qtutor/blob/main"
    student_first = _text(_nb(ROOT / "student" / chapter.name)["cells"][0])
    assert f"({colab}/student/{chapter.name})" in student_first and "/chapters/" not in student_first
    assert "Student edition" in student_first
    chapter_first = _text(_nb(chapter)["cells"][0])
    assert f"({colab}/chapters/{chapter.name})" in chapter_first
    assert f"({colab}/student/{chapter.name})" in chapter_first
