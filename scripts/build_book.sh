#!/usr/bin/env bash
# Build the book as CI does and check it in a headless browser.
#
#   pip install -e ".[book]"          # once (see requirements-book.txt)
#   bash scripts/build_book.sh        # from the repository root
#
# 1. the repository checks: vendored MathJax present, Colab badges and install lines derived
#    from _config.yml, chapter outputs stripped;
# 2. jupyter-book build, executing every chapter (QTUTOR_FAST=1 unless set), warnings as errors;
# 3. .ci/check_site.py on the front page and every chapter page, in the browser named by CHROME
#    if set, else the first of chromium, chromium-browser and google-chrome on PATH (Debian's
#    chromium is installed with apt when none is found and running as root);
# 4. the student edition, written to _build/student (checks that solutions strip cleanly).
# Set BOOK_DIR to build another tree laid out the same way (e.g. one from scripts/book_smoke.py).
# BOOK_EXECUTE=off builds from notebooks that were already executed in place (CI runs them once,
# with `pytest --nbmake --overwrite`, and does not run them a second time); the stripped-output
# check is then skipped, since the outputs are the point.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BOOK_DIR="${BOOK_DIR:-$ROOT}"
export QTUTOR_FAST="${QTUTOR_FAST:-1}"
# Progress bars and library chatter go to stderr, which the site check rejects in a page.
export TQDM_DISABLE="${TQDM_DISABLE:-1}" HF_HUB_DISABLE_PROGRESS_BARS="${HF_HUB_DISABLE_PROGRESS_BARS:-1}"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
PY="${PYTHON:-python}"
cd "$BOOK_DIR"

step() { printf '\n== %s\n' "$*"; }

step "repository checks"
bash "$ROOT/scripts/fetch_mathjax.sh" --check
"$PY" "$ROOT/scripts/colab_badges.py" --root "$BOOK_DIR" --check
if [ "${BOOK_EXECUTE:-force}" != off ]; then
  "$PY" "$ROOT/scripts/strip_outputs.py" --check "$BOOK_DIR"/chapters/*.ipynb
fi

find_browser() {
  local name
  for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}
if [ -n "${CHROME:-}" ]; then
  browser="$(command -v "$CHROME" 2>/dev/null)" || { echo "build_book: CHROME=$CHROME: no such browser" >&2; exit 1; }
elif ! browser="$(find_browser)"; then
  if [ "$(id -u)" = 0 ]; then
    step "installing chromium (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    browser="$(command -v chromium)" || { echo "build_book: apt installed no chromium" >&2; exit 1; }
  else
    echo "build_book: no chromium, chromium-browser or google-chrome found (apt-get install -y chromium, or set CHROME)" >&2
    exit 1
  fi
fi

step "jupyter-book build (QTUTOR_FAST=$QTUTOR_FAST)"
start=$(date +%s)
config=()
if [ "${BOOK_EXECUTE:-force}" = off ]; then
  sed 's/^\(  execute_notebooks:\) force/\1 "off"/' "$BOOK_DIR/_config.yml" > "$BOOK_DIR/_config.ci.yml"
  grep -q 'execute_notebooks: "off"' "$BOOK_DIR/_config.ci.yml" || { echo "build_book: could not turn execution off" >&2; exit 1; }
  config=(--config "$BOOK_DIR/_config.ci.yml")
fi
jupyter-book build "$BOOK_DIR" "${config[@]}" -W -n --keep-going
echo "build_book: book built in $(( $(date +%s) - start ))s"

step "headless browser check ($browser)"
pages=(book/how-to-read-and-run.html:0 book/glossary.html:0 book/references.html:0)
for nb in "$BOOK_DIR"/chapters/*.ipynb; do
  pages+=("chapters/$(basename "${nb%.ipynb}").html")
done
"$PY" "$ROOT/.ci/check_site.py" "$BOOK_DIR/_build/html" "${pages[@]}" \
  --screenshots "$BOOK_DIR/_build/screenshots" --chromium "$browser"

step "student edition"
"$PY" "$ROOT/scripts/student_edition.py" "$BOOK_DIR/chapters" "$BOOK_DIR/_build/student"
