#!/usr/bin/env bash
# Prepare what benchmarks/gpu_run.sh needs on a GPU machine that reaches no package index:
# wheels for Python 3.12 (x86_64 Linux) of what such a machine may lack (the rehearsal's
# notebook kernel, coremltools for chapter 7), and a copy of WikiText-2 in the Hugging Face
# layout. Everything goes to DEST (default .carry, ignored by git), which the machine gets with
# the working tree; there: WHEELS=DEST/wheels DATA_DIR=DEST/hf-wikitext bash benchmarks/gpu_run.sh
#
#   bash scripts/device_carry.sh [DEST] [WIKITEXT_DIR]
#
# WIKITEXT_DIR defaults to $QTUTOR_WIKITEXT. torch, numpy, transformers, triton, pandas and
# their dependencies (sympy included) are left to the machine: replacing them would change what
# is measured, and the wheels of some (pyarrow for `datasets`) are too large to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.carry}
WIKI=${2:-${QTUTOR_WIKITEXT:-}}
mkdir -p "$DEST/wheels"
PACKAGES=(
  # the rehearsal runs each chapter in a Jupyter kernel
  nbformat nbclient ipykernel jupyter_client jupyter_core comm pyzmq tornado traitlets fastjsonschema
  jsonschema jsonschema-specifications referencing rpds-py attrs nest_asyncio matplotlib-inline psutil
  platformdirs debugpy ipython ipython-pygments-lexers decorator jedi parso prompt-toolkit wcwidth pexpect
  ptyprocess stack-data executing asttokens pure-eval pygments
  # chapter 7's Core ML export
  coremltools==9.0 cattrs pyaml
)
for p in "${PACKAGES[@]}"; do
  pip download -q --no-deps --python-version 312 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST/wheels" "$p"
done
if [ -n "$WIKI" ]; then
  rm -rf "$DEST/hf-wikitext" && cp -r "$WIKI" "$DEST/hf-wikitext"
else
  echo "no WikiText-2 folder given (second argument or \$QTUTOR_WIKITEXT): the bench and the rehearsal need one"
fi
du -sh "$DEST"
