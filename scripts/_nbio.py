"""Read and write .ipynb files with the standard library, byte-compatible with nbformat.

Shared by the scripts in this folder. Notebooks are written the way Jupyter and nbformat write
them (sorted keys, indent 1, multi-line strings split into lists of lines, trailing newline), so
a script that changes nothing leaves the file's bytes unchanged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

MULTILINE_KEYS = ("source",)
MULTILINE_OUTPUT_KEYS = ("text",)


def read(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def text(value) -> str:
    """A cell's source (or an output's text) as one string, whichever way it is stored."""
    return "".join(value) if isinstance(value, list) else (value or "")


def _split(value: str) -> list[str]:
    return value.splitlines(keepends=True)


def dumps(nb: dict) -> str:
    """Serialize like nbformat.write: split multi-line strings, sorted keys, indent 1."""
    for cell in nb.get("cells", []):
        for key in MULTILINE_KEYS:
            if isinstance(cell.get(key), str):
                cell[key] = _split(cell[key])
        for out in cell.get("outputs", []) or []:
            for key in MULTILINE_OUTPUT_KEYS:
                if isinstance(out.get(key), str):
                    out[key] = _split(out[key])
            data = out.get("data") or {}
            for mime, val in data.items():
                if isinstance(val, str) and not mime.endswith("json"):
                    data[mime] = _split(val)
    s = json.dumps(nb, indent=1, sort_keys=True, separators=(",", ": "), ensure_ascii=False)
    return s if s.endswith("\n") else s + "\n"


def same(a: dict, b: dict) -> bool:
    """Whether two notebooks have the same content (formatting on disk aside)."""
    return dumps(copy.deepcopy(a)) == dumps(copy.deepcopy(b))


def write(path: Path, nb: dict) -> None:
    Path(path).write_text(dumps(nb), encoding="utf-8")
