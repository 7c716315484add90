"""The ``qtutor`` command: ``qtutor bench ...`` (see ``qtutor bench --help``)."""
from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qtutor bench [options]   (qtutor bench --help for the options)")
        return 0 if argv else 2
    if argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    print(f"qtutor: error: unknown command {argv[0]!r}; the command is 'qtutor bench'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
