"""``qtutor grade``: execute students' notebooks and score every exercise with its checker.

    qtutor grade NOTEBOOK_OR_FOLDER... --out scores.json [--timeout S] [--fast]

For each notebook (a folder stands for the ``*.ipynb`` files under it):

1. find the exercises: every ``{exercise}`` directive of a markdown cell, identified by its
   ``:label:`` (e.g. ``ex-ch02-per-token``), and the first ``chXX.check_*(...)`` call (a
   :mod:`qtutor.checks` checker) in a code cell after it and before the next exercise;
2. execute the notebook top to bottom in a fresh kernel (nbclient), in its own folder, going
   on after a cell that fails (its error is recorded) or runs over ``timeout`` seconds (it is
   interrupted);
3. in the same kernel, evaluate each exercise's checker call again, as the notebook wrote it,
   with ``chXX`` bound to the installed checker module, and record whether it returned True
   and the line it printed.

``scores.json`` is rewritten (atomically) after every notebook, so a long run that stops keeps
what it computed. Its layout::

    {"qtutor_grade": 1, "notebooks": {"PATH": {
        "status": "graded" | "error" | "running", "error": null | "one line",
        "seconds": 12.3, "score": 3, "max_score": 4,
        "cell_errors": [{"cell": 7, "error": "NameError: name 'x' is not defined"}],
        "exercises": {"ex-ch00-fp16-spacing": {"checker": "ch00.check_fp16_spacing",
            "call": "ch00.check_fp16_spacing(fp16_spacing)", "passed": true, "score": 1,
            "message": "correct: fp16 spacing at 9 points, subnormals included"}}}}}

The grader runs the students' code with the grader's permissions, as executing any notebook
does: run it in a container or a throw-away account, and read the scores as what the checkers
said about the functions the notebook defined, not as a defence against a student who edits
the checkers from inside the notebook.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import QtutorError

FORMAT = 1
MARK = "QTUTOR-GRADE "  # prefix of the line a grading cell prints
EXERCISE_RE = re.compile(r"^\s{0,3}(?P<fence>`{3,}|:{3,})\s*\{exercise\}", re.M)
LABEL_RE = re.compile(r"^\s*:label:\s*(\S+)")
CHECK_MODULE_RE = re.compile(r"^ch\d\d$")


@dataclass
class Exercise:
    """One exercise of a notebook: its label, the markdown cell that states it, and the checker
    call that follows it (None when no call follows)."""

    label: str
    cell: int
    module: Optional[str] = None  # "ch02"
    checker: Optional[str] = None  # "check_per_token_quant"
    call: Optional[str] = None  # "ch02.check_per_token_quant(quantize_per_token)", as written
    call_cell: Optional[int] = None


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _exercise_labels(markdown: str, cell: int) -> list[str]:
    """Labels of the ``{exercise}`` directives in one markdown cell (``exercise-CELL-N`` for
    an exercise without a label)."""
    labels = []
    for n, m in enumerate(EXERCISE_RE.finditer(markdown)):
        label = f"exercise-{cell}-{n}"
        for line in markdown[m.end() :].split("\n")[1:]:
            if not line.strip().startswith(":"):
                break  # the directive's options end at the first line that is not one
            found = LABEL_RE.match(line)
            if found:
                label = found.group(1)
                break
        labels.append(label)
    return labels


def _checker_calls(code: str) -> list[tuple[str, str, str]]:
    """``(module, checker, call text)`` for every ``chXX.check_*(...)`` call in a code cell, in
    source order. IPython magics and shell lines are blanked before parsing."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in code.split("\n")]
    text = "\n".join(lines)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    calls = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and CHECK_MODULE_RE.match(node.func.value.id)
            and node.func.attr.startswith("check_")
        ):
            calls.append((node.lineno, node.col_offset, node.func.value.id, node.func.attr, node))
    calls.sort(key=lambda c: (c[0], c[1]))
    return [(mod, chk, ast.get_source_segment(text, node)) for _, _, mod, chk, node in calls]


def find_exercises(nb: dict) -> list[Exercise]:
    """The exercises of a notebook (a dict in nbformat 4), in order, each paired with the first
    checker call after it (and before the next exercise)."""
    cells = nb.get("cells", [])
    exercises: list[Exercise] = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") == "markdown":
            exercises += [Exercise(label, i) for label in _exercise_labels(_source(cell), i)]
    for k, ex in enumerate(exercises):
        end = exercises[k + 1].cell if k + 1 < len(exercises) else len(cells)
        for j in range(ex.cell + 1, end):
            if cells[j].get("cell_type") != "code":
                continue
            calls = _checker_calls(_source(cells[j]))
            if calls:
                ex.module, ex.checker, ex.call = calls[0]
                ex.call_cell = j
                break
    return exercises


# --------------------------------------------------------------------------- in the kernel
def run_check(label: str, module: str, call: str, namespace: dict) -> None:
    """Runs in the student's kernel: evaluate the checker ``call`` (e.g.
    ``"ch02.check_per_token_quant(quantize_per_token)"``) in the notebook's ``namespace``, with
    ``module`` ("ch02") bound to :mod:`qtutor.checks.ch02`, and print one line ``MARK {json}``:
    ``passed`` (the checker returned True) and ``message`` (the line it printed, or the error)."""
    scope = dict(namespace)
    scope[module] = importlib.import_module(f"qtutor.checks.{module}")
    out = io.StringIO()
    passed, message = False, ""
    try:
        with contextlib.redirect_stdout(out):
            passed = eval(call, scope) is True
    except BaseException as err:  # noqa: BLE001 (an interrupt from the cell timeout included)
        message = f"the check did not finish: {type(err).__name__}: {err}".strip()
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    verdicts = [line for line in lines if line.startswith(("correct:", "not yet:"))]
    if not message:
        message = verdicts[-1] if verdicts else (lines[-1] if lines else "the checker printed nothing")
    print(MARK + json.dumps({"label": label, "passed": passed, "message": message}))


def _grading_cell(ex: Exercise) -> dict:
    import nbformat

    code = (
        "from qtutor.grade import run_check as __qtutor_run_check\n"
        f"__qtutor_run_check({ex.label!r}, {ex.module!r}, {ex.call!r}, globals())"
    )
    return nbformat.v4.new_code_cell(code, metadata={"tags": ["qtutor-grade"]})


# --------------------------------------------------------------------------- notebooks
def notebooks_in(paths: list) -> list[Path]:
    """The notebooks that ``paths`` name (files, or folders searched recursively), checked to
    exist and to be notebooks: a :class:`QtutorError` (one line) for the first that is not."""
    import nbformat

    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
            if not inside:
                raise QtutorError(f"no notebooks (*.ipynb) in the folder {p}")
            found += inside
        elif p.is_file():
            if p.suffix != ".ipynb":
                raise QtutorError(f"{p} is not a notebook: give .ipynb files or folders that hold them")
            found.append(p)
        else:
            raise QtutorError(f"no such file or folder: {p}")
    for p in found:
        try:
            nbformat.read(p, as_version=4)
        except Exception as err:
            raise QtutorError(f"{p} is not a readable notebook ({type(err).__name__}: {err})".split("\n")[0]) from None
    unique: dict = {}
    for p in found:  # each notebook once, named as the command line named it
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _write(out: Path, scores: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(scores, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def _error_line(output: dict) -> str:
    return f"{output.get('ename', 'Error')}: {output.get('evalue', '')}".strip().split("\n")[0][:500]


def grade_notebook(path: Path, timeout: int = 600, kernel: Optional[str] = None, fast: bool = False) -> dict:
    """Execute one notebook and score its exercises: the record ``scores.json`` keeps for it."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    exercises = find_exercises(nb)
    record: dict = {
        "status": "graded",
        "error": None,
        "seconds": None,
        "score": 0,
        "max_score": len(exercises),
        "cell_errors": [],
        "exercises": {},
    }
    for ex in exercises:
        record["exercises"][ex.label] = {
            "checker": f"{ex.module}.{ex.checker}" if ex.checker else None,
            "call": ex.call,
            "passed": False,
            "score": 0,
            "message": "no qtutor.checks call follows this exercise: nothing to grade it with"
            if ex.call is None
            else "not graded: the notebook did not run to the end",
        }
    n_cells = len(nb.cells)
    graded = [ex for ex in exercises if ex.call is not None]  # one grading cell each, at the end
    nb.cells += [_grading_cell(ex) for ex in graded]
    kernel_name = kernel or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        allow_errors=True,
        interrupt_on_timeout=True,
        error_on_timeout={"ename": "Timeout", "evalue": f"the cell ran over {timeout} s and was interrupted"},
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    saved = os.environ.get("QTUTOR_FAST")
    if fast:
        os.environ["QTUTOR_FAST"] = "1"
    try:
        client.execute()
    except Exception as err:  # the kernel died or would not start: keep what ran
        record["status"] = "error"
        record["error"] = f"{type(err).__name__}: {err}".strip().split("\n")[0][:500]
    finally:
        if fast:
            if saved is None:
                os.environ.pop("QTUTOR_FAST", None)
            else:
                os.environ["QTUTOR_FAST"] = saved
    record["seconds"] = round(time.perf_counter() - start, 1)
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if i < n_cells and output.get("output_type") == "error":
                line = _error_line(output)
                if output.get("ename") == "KeyboardInterrupt":  # the grader's interrupt
                    line = f"Timeout: the cell ran over {timeout} s and was interrupted"
                record["cell_errors"].append({"cell": i, "error": line})
            if i >= n_cells and output.get("output_type") == "stream":
                for line in output.get("text", "").splitlines():
                    if line.startswith(MARK):
                        result = json.loads(line[len(MARK) :])
                        entry = record["exercises"][result["label"]]
                        entry["passed"] = bool(result["passed"])
                        entry["score"] = int(entry["passed"])
                        entry["message"] = result["message"]
            if i >= n_cells and output.get("output_type") == "error":
                entry = record["exercises"][graded[i - n_cells].label]
                if not entry["passed"]:
                    entry["message"] = f"the check did not finish: {_error_line(output)}"
    record["score"] = sum(e["score"] for e in record["exercises"].values())
    return record


def grade(
    paths: list,
    out: Path,
    timeout: int = 600,
    kernel: Optional[str] = None,
    fast: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Grade every notebook ``paths`` name into ``out`` (rewritten after each notebook); returns
    the scores. Bad input (a missing path, a file that is not a notebook) raises a one-line
    :class:`QtutorError` before anything runs."""
    try:
        import nbclient  # noqa: F401
    except ImportError:
        raise QtutorError(
            "qtutor grade executes notebooks with nbclient and ipykernel: pip install nbclient ipykernel"
        ) from None
    notebooks = notebooks_in(paths)
    out = Path(out)
    if out.is_dir():
        raise QtutorError(f"--out {out} is a folder: give the path of the JSON file to write")
    if not out.parent.is_dir():
        raise QtutorError(f"--out {out}: the folder {out.parent} does not exist")
    scores: dict = {"qtutor_grade": FORMAT, "notebooks": {}}
    for path in notebooks:
        key = str(path)
        scores["notebooks"][key] = {"status": "running"}
        _write(out, scores)
        record = grade_notebook(path, timeout=timeout, kernel=kernel, fast=fast)
        scores["notebooks"][key] = record
        _write(out, scores)
        state = f"error: {record['error']}" if record["status"] == "error" else "graded"
        errors = f", {len(record['cell_errors'])} cells raised" if record["cell_errors"] else ""
        log(
            f"{key}: {record['score']}/{record['max_score']} exercises passed "
            f"({state}{errors}, {record['seconds']:.0f} s)"
        )
    return scores
