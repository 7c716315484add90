#!/usr/bin/env bash
# Vendor MathJax 3 into book/_static/mathjax/ so the book renders math without a CDN.
#
# The book's _config.yml points sphinx's `mathjax_path` at
# book/_static/mathjax/tex-chtml-full.js (served from the site's own _static/).
# That one file holds the TeX input (all extensions), the CHTML output and the menu; CHTML
# also needs its web fonts, which MathJax loads from output/chtml/fonts/woff-v2/ relative to
# the script, so we copy those too. ~1.7 MB in all, committed to git.
#
# Usage: scripts/fetch_mathjax.sh            (re)install from the npm registry
#        scripts/fetch_mathjax.sh --check    exit 1 if the vendored copy is missing or not $VERSION
# Needs: npm (only to refresh; the committed copy is what the book build uses).
set -euo pipefail

VERSION="3.2.2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/book/_static/mathjax"
FONTS="output/chtml/fonts/woff-v2"

installed_version() {
  [ -f "$DEST/VERSION" ] && cat "$DEST/VERSION" || true
}

if [ "${1:-}" = "--check" ]; then
  if [ "$(installed_version)" = "$VERSION" ] && [ -s "$DEST/tex-chtml-full.js" ] \
     && ls "$DEST/$FONTS"/*.woff >/dev/null 2>&1; then
    exit 0
  fi
  echo "book/_static/mathjax is missing or not MathJax $VERSION: run scripts/fetch_mathjax.sh" >&2
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
( cd "$TMP" && npm install --silent --no-audit --no-fund --no-save "mathjax@$VERSION" >/dev/null )
SRC="$TMP/node_modules/mathjax"

rm -rf "$DEST"
mkdir -p "$DEST/$FONTS"
cp "$SRC/es5/tex-chtml-full.js" "$DEST/"
cp "$SRC/es5/$FONTS"/*.woff "$DEST/$FONTS/"
cp "$SRC/LICENSE" "$DEST/LICENSE"
echo "$VERSION" > "$DEST/VERSION"
cat > "$DEST/README.txt" <<EOT
MathJax $VERSION (Apache-2.0, see LICENSE), copied from the npm package \`mathjax\` by
\`scripts/fetch_mathjax.sh\`: es5/tex-chtml-full.js and es5/$FONTS/. Do not edit by hand.
EOT
echo "MathJax $VERSION -> ${DEST#$ROOT/} ($(du -sh "$DEST" | cut -f1))"
