#!/usr/bin/env python
"""Lay out a copy of the book with placeholder chapters, to test the book's machinery alone.

    python scripts/book_smoke.py /tmp/qtutor-smoke
    QTUTOR_FAST=1 jupyter-book build /tmp/qtutor-smoke -W -n --keep-going
    python .ci/check_site.py /tmp/qtutor-smoke/_build/html chapters/01_rtn.html

Copies _config.yml, _toc.yml and book/ into OUT_DIR and writes, for every chapters/... entry of
_toc.yml, a small notebook that exercises what the real chapters use: a title with a Colab
badge, a `parameters` cell with the guarded Colab install, display and inline math, an amsmath
environment, a matplotlib figure captioned through cell metadata and one through `glue`, a
collapsed check cell, a citation, a glossary term, and an exercise with a dropdown solution.
Then runs scripts/colab_badges.py on them. The real chapters are not touched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nbio  # noqa: E402


def md(src: str, **meta) -> dict:
    return {"cell_type": "markdown", "metadata": meta, "source": src}


def code(src: str, **meta) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": meta, "outputs": [], "source": src}


def chapter(stem: str) -> dict:
    n = stem.split("_")[0]
    fig = f"fig-{stem.replace('_', '-')}-curve"
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "cells": [
            md(f"# Placeholder chapter {n}\n\nWhat you will learn: nothing yet; this page tests the book's machinery."),
            code(
                'import os\n\nFAST = os.environ.get("QTUTOR_FAST") == "1"\nMODEL = "qtutor-tiny"\n'
                'import sys\nif "google.colab" in sys.modules:\n'
                '    %pip install -q "git+https://example.invalid/old/url"',
                tags=["parameters"],
            ),
            md(
                "A uniform grid maps a weight $w$ to $q = \\mathrm{round}(w/s) + z$ and back:\n\n"
                "$$\n\\hat w = s\\,(q - z)\n$$ (eq-" + stem.replace("_", "-") + ")\n\n"
                "\\begin{align}\nE &= \\lVert W X - \\hat W X \\rVert_F^2 \\\\\n"
                "H &= 2 X X^\\top\n\\end{align}\n\n"
                "See {cite}`frantar2022gptq` and the {term}`perplexity` entry of the glossary."
            ),
            code(
                "import numpy as np\nimport matplotlib\nimport matplotlib.pyplot as plt\n\n"
                "x = np.linspace(-3, 3, 200)\nfig, ax = plt.subplots(figsize=(5, 3))\n"
                "ax.plot(x, np.round(x * 2) / 2, label='quantized')\nax.plot(x, x, label='identity')\n"
                "ax.legend()\nplt.show()",
                mystnb={"figure": {"caption": "A uniform quantizer (caption from cell metadata).", "name": fig}},
            ),
            md(f"{{numref}}`{fig}` shows the staircase."),
            code(
                "from myst_nb import glue\n\nfig2, ax2 = plt.subplots(figsize=(4, 3))\n"
                "ax2.hist(np.random.default_rng(0).normal(size=1000), bins=30)\n"
                f"glue('{stem}-hist', fig2, display=False)\nplt.close(fig2)\n"
                f"glue('{stem}-n', 1000)",
                tags=["remove-cell"],
            ),
            md(
                f"```{{glue:figure}} {stem}-hist\n:name: fig-{stem.replace('_', '-')}-hist\n\n"
                f"A histogram of {{glue:text}}`{stem}-n` normal draws (glued figure).\n```"
            ),
            code(
                "import numpy.testing as npt\n\nnpt.assert_allclose(np.round(0.49), 0.0)\nprint('check passed')",
                tags=["hide-input"],
            ),
            md(
                f"```{{exercise}}\n:label: ex-{stem.replace('_', '-')}-1\n\nWhat is "
                "$\\mathrm{round}(2.5)$ in NumPy?\n```\n\n"
                f"````{{solution}} ex-{stem.replace('_', '-')}-1\n:class: dropdown\n\n"
                "NumPy rounds half to even:\n\n```python\nnp.round(2.5)  # 2.0\n```\n````"
            ),
            code("print(np.round(2.5))"),
        ],
    }
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    return nb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    out = args.out.resolve()
    if out == ROOT or ROOT in out.parents:
        sys.exit("book_smoke: OUT_DIR must be outside the repository")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, out / name)
    shutil.copytree(ROOT / "book", out / "book")
    (out / "chapters").mkdir()
    stems = []
    for line in (ROOT / "_toc.yml").read_text().splitlines():
        line = line.strip()
        if line.startswith("- file: chapters/"):
            stems.append(line.split("chapters/", 1)[1].strip())
    for stem in stems:
        _nbio.write(out / "chapters" / f"{stem}.ipynb", chapter(stem))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "colab_badges.py"), "--root", str(out)], check=True)
    print(f"book_smoke: {len(stems)} placeholder chapters in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
