#!/usr/bin/env python
"""Derive every chapter's "Open in Colab" badge and Colab install line, and the links to the
published site, from _config.yml.

The repository's public URL is written once, as `repository.url` (and `repository.branch`) in
_config.yml. This script rewrites, in each chapters/*.ipynb:

* in the first markdown cell, the line containing `colab-badge.svg` (inserted after the title
  if missing) to
  [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/BRANCH/chapters/FILE.ipynb)
  followed by a second badge that opens the student edition of the chapter, student/FILE.ipynb
  (the chapter runs its solutions after the exercise cells; students work in the student
  edition, which scripts/student_edition.py writes with this script's student badge line);
* in the parameters cell (the code cell tagged `parameters`, else the first code cell), the
  `%pip install` line guarded by a `google.colab` check, so that it installs
  `git+URL@BRANCH` (the rest of the line, e.g. `-q` or extras `qtutor[coreml] @ git+...`,
  is kept); a guarded block is appended if the cell has none.

It also rewrites the links to the book's site in README.md and book/how-to-read-and-run.md (those
of them that exist under the root): the site is published on GitHub Pages
(.github/workflows/book.yml), at https://OWNER.github.io/REPO/ for https://github.com/OWNER/REPO.
Every https://....github.io/ link in those files must start with that address (a stale one has
its https://HOST.github.io/NAME/ prefix replaced), and README.md must link it.

Usage:
    python scripts/colab_badges.py            # rewrite the notebooks in place
    python scripts/colab_badges.py --check    # exit 1 if any notebook or site link is out of date
    python scripts/colab_badges.py [--root DIR] [NOTEBOOK ...]

Idempotent: a second run changes nothing.
"""

from __future__ import annotations

import argparse
import copy
import posixpath
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nbio  # noqa: E402

BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB = "https://colab.research.google.com/github"
GIT_URL_RE = re.compile(r"git\+https?://[^\s\"'#]+")


def read_repository(config: Path) -> tuple[str, str, str]:
    """(url, branch, path_to_book) from the `repository:` section of _config.yml."""
    text = config.read_text(encoding="utf-8")
    try:
        import yaml

        repo = (yaml.safe_load(text) or {}).get("repository") or {}
    except ImportError:  # fall back to a minimal parse of the `repository:` block
        repo, inside = {}, False
        for line in text.splitlines():
            if re.match(r"^repository\s*:", line):
                inside = True
            elif inside and re.match(r"^\S", line):
                break
            elif inside and (m := re.match(r"^\s+(\w+)\s*:\s*\"?([^\"#]*?)\"?\s*(#.*)?$", line)):
                repo[m.group(1)] = m.group(2)
    url = str(repo.get("url") or "").strip().rstrip("/")
    if url.endswith(".git"):
        url = url[: -len(".git")]
    if not url:
        sys.exit(f"colab_badges: no repository.url in {config}")
    branch = str(repo.get("branch") or "main").strip()
    path_to_book = str(repo.get("path_to_book") or "").strip().strip("/")
    return url, branch, path_to_book


STUDENT_DIR = "student"  # the student edition, beside chapters/ in the repository


def _owner_repo(url: str) -> tuple[str, str]:
    parts = [p for p in urlparse(url).path.split("/") if p]
    if len(parts) < 2:
        sys.exit(f"colab_badges: repository.url {url!r} is not https://github.com/OWNER/REPO")
    return parts[0], parts[1]


def colab_url(url: str, branch: str, nb_path_in_repo: str) -> str:
    """The address that opens the notebook at `nb_path_in_repo` of the repository in Colab."""
    owner, repo = _owner_repo(url)
    return f"{COLAB}/{owner}/{repo}/blob/{branch}/{nb_path_in_repo}"


def _badge(url: str, branch: str, nb_path_in_repo: str) -> str:
    return f"[![Open In Colab]({BADGE_IMG})]({colab_url(url, branch, nb_path_in_repo)})"


# ---------------------------------------------------------------------------------------------
# the site's address in the documents

SITE_DOCS = ("README.md", "book/how-to-read-and-run.md")  # relative to the root; README must link it
SITE_LINK_RE = re.compile(r"https?://[A-Za-z0-9-]+\.github\.io/[^\s)\]>\"'`<]*")
SITE_PREFIX_RE = re.compile(r"https?://[A-Za-z0-9-]+\.github\.io/(?:[A-Za-z0-9._-]+(?:/|$))?")


def site_url(url: str) -> str:
    """The GitHub Pages address of the repository: https://OWNER.github.io/REPO/ (the root of
    https://OWNER.github.io/ for a repository named OWNER.github.io)."""
    owner, repo = _owner_repo(url)
    host = f"{owner.lower()}.github.io"
    return f"https://{host}/" if repo.lower() == host else f"https://{host}/{repo}/"


def _moved(link: str, site: str) -> str:
    if (link if link.endswith("/") else link + "/").startswith(site):
        return link  # under the site already (or the site without its last slash)
    return SITE_PREFIX_RE.sub(site, link, count=1)


def fix_site_links(text: str, site: str) -> str:
    """`text` with every github.io link that does not start with `site` moved under it."""
    return SITE_LINK_RE.sub(lambda m: _moved(m[0], site), text)


def site_links(root: Path, site: str, fix: bool) -> tuple[list[str], bool]:
    """The SITE_DOCS under `root` with a github.io link outside `site` (rewritten when `fix`),
    and whether README.md, if there is one, lacks a link to `site`."""
    stale, unlinked = [], False
    for rel in SITE_DOCS:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        fixed = fix_site_links(text, site)
        if fixed != text:
            stale.append(rel)
            if fix:
                path.write_text(fixed, encoding="utf-8")
        if rel == "README.md" and site not in fixed:
            unlinked = True
    return stale, unlinked


def badge_line(url: str, branch: str, nb_path_in_repo: str) -> str:
    """The badge line of a notebook. A chapter's opens the chapter and, second, its student
    edition (the same name under student/); a student notebook's (one under student/) opens
    itself and says that it is the student edition."""
    folder, name = posixpath.split(nb_path_in_repo)
    if posixpath.basename(folder) == STUDENT_DIR:
        return (
            f"{_badge(url, branch, nb_path_in_repo)} *Student edition: the solutions are removed; "
            "run the check under each exercise to test your answer.*"
        )
    student = posixpath.join(posixpath.dirname(folder), STUDENT_DIR, name)
    return (
        f"{_badge(url, branch, nb_path_in_repo)} &nbsp; Doing the exercises? Open the student edition, "
        f"without the solutions: {_badge(url, branch, student)}"
    )


def fix_badge(cell: dict, badge: str) -> None:
    lines = _nbio.text(cell["source"]).split("\n")
    for i, line in enumerate(lines):
        if "colab-badge.svg" in line:
            lines[i] = badge
            break
    else:
        title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
        if title is None:
            lines[0:0] = [badge, ""]
        else:
            rest = lines[title + 1 :]
            while rest and not rest[0].strip():
                rest.pop(0)
            lines[title + 1 :] = ["", badge, ""] + rest if rest else ["", badge]
    cell["source"] = "\n".join(lines)


def fix_install(cell: dict, target: str) -> None:
    lines = _nbio.text(cell["source"]).split("\n")
    guarded, found = False, False
    for i, line in enumerate(lines):
        if "google.colab" in line:
            guarded = True
        stripped = line.lstrip()
        if guarded and re.match(r"[%!]pip\s+install\b", stripped):
            found = True
            if GIT_URL_RE.search(line):
                lines[i] = GIT_URL_RE.sub(lambda _m: target, line)
            else:  # a guarded install without a git URL: make it install ours
                indent = line[: len(line) - len(stripped)]
                lines[i] = f'{indent}%pip install -q "{target}"'
    if not found:
        while lines and not lines[-1].strip():
            lines.pop()
        block = [
            'if "google.colab" in sys.modules:  # in Colab, install qtutor from the repository',
            f'    %pip install -q "{target}"',
        ]
        if not any(re.match(r"^\s*import\s+.*\bsys\b", line) for line in lines):
            block.insert(0, "import sys")
        lines += ([""] if lines else []) + block
    cell["source"] = "\n".join(lines)


def update(nb: dict, badge: str, target: str) -> dict:
    nb = copy.deepcopy(nb)
    cells = nb.get("cells", [])
    md = next((c for c in cells if c.get("cell_type") == "markdown"), None)
    if md is not None:
        fix_badge(md, badge)
    code = [c for c in cells if c.get("cell_type") == "code"]
    params = next((c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if params is None and code:
        params = code[0]
    if params is not None:
        fix_install(params, target)
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: ROOT/chapters/*.ipynb")
    ap.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="book root holding _config.yml (default: the repository)",
    )
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if out of date")
    args = ap.parse_args(argv)

    root = args.root.resolve()
    url, branch, path_to_book = read_repository(root / "_config.yml")
    target = f"git+{url}@{branch}"
    notebooks = args.notebooks or sorted((root / "chapters").glob("*.ipynb"))
    stale = []
    for path in notebooks:
        path = path.resolve()
        rel = path.relative_to(root).as_posix()
        in_repo = f"{path_to_book}/{rel}" if path_to_book else rel
        nb = _nbio.read(path)
        new = update(nb, badge_line(url, branch, in_repo), target)
        if _nbio.same(nb, new):
            continue
        stale.append(rel)
        if not args.check:
            _nbio.write(path, new)
    site = site_url(url)
    stale_docs, unlinked = site_links(root, site, fix=not args.check)
    problems = []
    if args.check and (stale or stale_docs):
        problems.append(f"out of date (run python scripts/colab_badges.py): {', '.join(stale + stale_docs)}")
    if unlinked:
        problems.append(f"README.md does not link the site, {site}")
    if problems:
        print(f"colab_badges: {'; '.join(problems)}")
        return 1
    if not args.check:
        print(
            f"colab_badges: {len(notebooks)} notebooks, {len(stale)} updated, "
            f"{len(stale_docs)} documents' site links updated ({url}, branch {branch}, site {site})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
