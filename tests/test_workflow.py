""".github/workflows/book.yml, the workflow that builds the book on pull requests and publishes it
to GitHub Pages on pushes to main: its triggers, jobs and permissions, and the commands it
names, run here where a test can run them (the site assembly, the torch install, the browser
choice, the site links derived from _config.yml)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"
sys.path.insert(0, str(ROOT / "scripts"))
import colab_badges  # noqa: E402

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _triggers(wf: dict) -> dict:
    # YAML 1.1 (pyyaml) reads the bare key `on` as the boolean true; GitHub reads it as "on"
    return wf["on"] if "on" in wf else wf[True]


def _steps(job: str) -> list[dict]:
    return _workflow()["jobs"][job]["steps"]


def _runs(job: str) -> list[str]:
    return [step["run"].strip() for step in _steps(job) if "run" in step]


def _step_using(job: str, action: str) -> tuple[int, dict]:
    found = [(i, s) for i, s in enumerate(_steps(job)) if s.get("uses", "").split("@")[0] == action]
    assert len(found) == 1, f"{job} should use {action} once"
    return found[0]


def _assembly() -> tuple[int, list[str]]:
    """The build job's site-assembly step: its index and its command's words."""
    found = [
        (i, shlex.split(s["run"])) for i, s in enumerate(_steps("build")) if "assemble_site.py" in s.get("run", "")
    ]
    assert len(found) == 1, "the build job should assemble the site in one step"
    return found[0]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------------
# the workflow file


def test_triggers_are_pull_requests_pushes_to_main_and_by_hand():
    on = _triggers(_workflow())
    assert set(on) == {"pull_request", "push", "workflow_dispatch"}
    assert on["push"] == {"branches": ["main"]}
    assert not on["pull_request"]  # every pull request, whatever its base


def test_the_build_job_runs_ci_itself_with_python_3_12():
    build = _workflow()["jobs"]["build"]
    assert build["runs-on"].startswith("ubuntu")
    i_python, setup = _step_using("build", "actions/setup-python")
    assert str(setup["with"]["python-version"]) == "3.12"
    runs = _runs("build")
    # Exactly the command CI is: .ci/run, the file README.md calls CI. It is not run here: it is
    # the whole CI (a fresh install, every test, this one included, the chapters and the book).
    assert runs.count("bash .ci/run") == 1
    ci = ROOT / ".ci" / "run"
    assert ci.is_file() and os.access(ci, os.X_OK)
    assert _run(["bash", "-n", str(ci)]).returncode == 0
    assert "CI (`.ci/run`)" in (ROOT / "README.md").read_text(encoding="utf-8")
    i_ci = next(i for i, s in enumerate(_steps("build")) if s.get("run", "").strip() == "bash .ci/run")
    i_checkout, _ = _step_using("build", "actions/checkout")
    assert i_checkout < i_python < i_ci < _assembly()[0]
    # on GitHub's runners: the CPU build of torch, and the preinstalled Chrome for the site check
    assert build["env"]["TORCH_INDEX_URL"] == CPU_INDEX
    assert build["env"]["CHROME"] == "google-chrome"


def test_every_run_command_names_a_script_of_the_repository():
    for job in _workflow()["jobs"]:
        for command in _runs(job):
            words = shlex.split(command)
            assert len(words) >= 2 and words[0] in ("bash", "python"), (
                f"{command!r}: this test knows `bash SCRIPT ...` and `python SCRIPT ...`; teach it this one"
            )
            script = ROOT / words[1]
            assert script.is_file() and os.access(script, os.X_OK), f"{command!r}: no script {words[1]}"
            if words[0] == "bash":
                assert _run(["bash", "-n", str(script)]).returncode == 0, command
            else:
                compile(script.read_text(encoding="utf-8"), str(script), "exec")


def test_only_a_push_to_main_deploys_with_the_pages_permissions():
    wf = _workflow()
    assert wf["permissions"] == {"contents": "read"}  # the build job gets no write access
    deploy = wf["jobs"]["deploy"]
    condition = [c.strip() for c in deploy["if"].split("&&")]
    assert sorted(condition) == ["github.event_name == 'push'", "github.ref == 'refs/heads/main'"]
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert deploy["concurrency"] == {"group": "pages", "cancel-in-progress": False}
    assert [s.get("uses", "").split("@")[0] for s in deploy["steps"]] == ["actions/deploy-pages"]
    assert "deploy-pages" not in WORKFLOW.read_text(encoding="utf-8").split("\n  deploy:")[0]


def test_the_uploaded_artifact_is_the_assembled_site():
    i_assembly, words = _assembly()
    i_upload, upload = _step_using("build", "actions/upload-pages-artifact")
    assert words[:2] == ["python", "scripts/assemble_site.py"] and len(words) == 5
    html, student, out = words[2:]
    assert i_assembly < i_upload and upload["with"]["path"] == out
    # the HTML is where build_book.sh (run by .ci/run from the root) writes it, the student
    # edition where student_edition.py and the Colab badges keep it
    assert html == "_build/html" and '"$BOOK_DIR/_build/html"' in (ROOT / "scripts" / "build_book.sh").read_text()
    assert student == colab_badges.STUDENT_DIR


# ---------------------------------------------------------------------------------------------
# the commands it names, run


@pytest.fixture
def built(tmp_path):
    """A stand-in for the repository after .ci/run: a small fake _build/html and the real student/."""
    html = tmp_path / "_build" / "html"
    for rel, text in {
        "index.html": '<meta http-equiv="Refresh" content="0; url=book/intro.html" />',
        "book/intro.html": "<html>the book</html>",
        "_static/site.css": "body {}",
    }.items():
        (html / rel).parent.mkdir(parents=True, exist_ok=True)
        (html / rel).write_text(text, encoding="utf-8")
    (tmp_path / "student").symlink_to(ROOT / "student", target_is_directory=True)
    return tmp_path


def _assemble(cwd: Path, words: list[str]):
    # python -> this interpreter; the script from the repository; its arguments relative to cwd
    return _run([sys.executable, str(ROOT / words[1]), *words[2:]], cwd=cwd)


def test_the_assembly_step_puts_the_student_edition_beside_the_book(built):
    _, words = _assembly()
    result = _assemble(built, words)
    assert result.returncode == 0, result.stderr
    html, student, out = (built / w for w in words[2:])
    for page in ("index.html", "book/intro.html", "_static/site.css"):
        assert (out / page).read_bytes() == (html / page).read_bytes()
    notebooks = sorted(p.name for p in (ROOT / "student").glob("*.ipynb"))
    assert notebooks == sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb"))
    assert sorted(p.name for p in (out / "student").glob("*.ipynb")) == notebooks
    index = (out / "student" / "index.html").read_text(encoding="utf-8")
    url, branch, _ = colab_badges.read_repository(ROOT / "_config.yml")
    for name in notebooks:
        published = (out / "student" / name).read_bytes()
        assert published == (student / name).read_bytes()  # the committed edition, byte for byte
        assert b"{solution" not in published and b'"solution"' not in published
        assert f'href="{name}" download' in index
        assert colab_badges.colab_url(url, branch, f"student/{name}") in index


def test_the_assembly_refuses_bad_input_in_one_line(built):
    _, words = _assembly()
    html, _, out = words[2:]
    cases = [
        (["_build/nowhere", "student", "site1"], "holds no index.html"),
        ([html, "_build", "site2"], "no notebooks in _build"),
    ]
    (built / "full").mkdir()
    (built / "full" / "x").write_text("x", encoding="utf-8")
    cases.append(([html, "student", "full"], "full exists and is not an empty folder"))
    for args, message in cases:
        result = _assemble(built, words[:2] + args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("assemble_site: ") and message in result.stderr
    assert _assemble(built, words).returncode == 0
    shutil.copytree(built / out, built / "again")  # a site that already holds a student/
    result = _assemble(built, [*words[:2], "again", "student", "site3"])
    assert result.returncode == 2 and "already has a student/" in result.stderr


@pytest.fixture
def fake_pip(tmp_path):
    """A `pip` first on PATH that writes its arguments to a file instead of installing."""
    bin_dir, log = tmp_path / "bin", tmp_path / "pip.log"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f'#!/usr/bin/env bash\necho "$*" >> {shlex.quote(str(log))}\n')
    (bin_dir / "pip").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, log


def test_torch_comes_from_torch_index_url_when_set_and_from_pip_otherwise(fake_pip):
    env, log = fake_pip
    script = str(ROOT / ".ci" / "install_torch.sh")
    assert _run(["bash", script, "2.13.0"], env=env).returncode == 0
    assert _run(["bash", script, "2.11"], env={**env, "TORCH_INDEX_URL": CPU_INDEX}).returncode == 0
    assert log.read_text().splitlines() == [
        "install -q torch==2.13.0",
        f"install -q --index-url {CPU_INDEX} torch==2.11",
    ]
    bad = _run(["bash", script], env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("install_torch: usage") and bad.stderr.count("\n") == 1
    # .ci/run installs torch only through it: the current pin in the first virtualenv, and
    # pyproject's minimum in the second when TORCH_INDEX_URL is set (unset, the pins install it)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    installs = [
        line.strip() for line in ci.splitlines() if "install_torch.sh" in line and not line.lstrip().startswith("#")
    ]
    assert installs == [
        "bash .ci/install_torch.sh 2.13.0",
        """bash .ci/install_torch.sh "$(sed -n 's/^torch==//p' "$mindir/pins.txt")\"""",
    ]
    assert not re.search(r"pip install[^\n]*\btorch==", ci)


def test_build_book_refuses_a_browser_it_cannot_find(tmp_path):
    env = {**os.environ, "CHROME": "no-such-browser", "BOOK_EXECUTE": "off", "PYTHON": sys.executable}
    result = _run(["bash", str(ROOT / "scripts" / "build_book.sh")], env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "build_book: CHROME=no-such-browser: no such browser"
    assert "jupyter-book build" not in result.stdout


# ---------------------------------------------------------------------------------------------
# the site's address, derived from _config.yml


def test_the_readme_and_the_how_to_page_link_the_site():
    url, _, _ = colab_badges.read_repository(ROOT / "_config.yml")
    site = colab_badges.site_url(url)
    assert site == "https://qtutor.github.io/qtutor/"
    assert site in (ROOT / "README.md").read_text(encoding="utf-8")
    how_to = (ROOT / "book" / "how-to-read-and-run.md").read_text(encoding="utf-8")
    assert f"{site}student/" in how_to and ".github/workflows/book.yml" in how_to
    assert colab_badges.site_url("https://github.com/Someone/someone.github.io") == "https://someone.github.io/"


def test_colab_badges_check_keeps_the_site_links_from_going_stale(tmp_path):
    root = tmp_path / "fork"
    (root / "book").mkdir(parents=True)
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    (root / "_config.yml").write_text(config.replace("github.com/qtutor/qtutor", "github.com/someone/qtutor"))
    for rel in colab_badges.SITE_DOCS:
        shutil.copyfile(ROOT / rel, root / rel)
    script = [sys.executable, str(ROOT / "scripts" / "colab_badges.py"), "--root", str(root)]
    check = _run([*script, "--check"])
    assert check.returncode == 1 and check.stdout.count("\n") == 1
    assert "out of date" in check.stdout and check.stdout.strip().endswith("README.md, book/how-to-read-and-run.md")
    assert _run(script).returncode == 0  # rewrites the links
    assert _run([*script, "--check"]).returncode == 0
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "https://someone.github.io/qtutor/" in readme and "qtutor.github.io" not in readme
    (root / "README.md").write_text(readme.replace("https://someone.github.io/qtutor/", "the site"))
    check = _run([*script, "--check"])
    assert check.returncode == 1
    assert check.stdout.strip() == "colab_badges: README.md does not link the site, https://someone.github.io/qtutor/"
