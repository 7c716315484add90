#!/usr/bin/env bash
# Install torch==VERSION into the active environment, before anything that depends on it.
#
#   bash .ci/install_torch.sh VERSION
#
# From pip's configured indexes by default (on the CI machine, a CPU wheel held locally). When
# TORCH_INDEX_URL is set, from that index only, e.g. https://download.pytorch.org/whl/cpu, the
# CPU builds: on PyPI, torch for Linux is a CUDA build of several GB (.github/workflows/book.yml
# sets it on GitHub's runners, which have no GPU).
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "install_torch: usage: bash .ci/install_torch.sh VERSION" >&2
  exit 2
fi
cmd=(pip install -q)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  cmd+=(--index-url "$TORCH_INDEX_URL")
fi
cmd+=("torch==$1")
echo "[ci] ${cmd[*]}"
"${cmd[@]}"
