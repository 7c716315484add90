#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, in one call: the CUDA tests, GPTQ's block loops
# side by side (gptq_speed.py), `qtutor bench` at
# Qwen2-0.5B's architecture (random weights: time and memory only), the per-matrix GEMVs and the
# full-mode rehearsal of the chapters under a Colab T4's 15 GiB. Steps run in the order given,
# each only while BUDGET seconds leave room for it, and every log lands in OUT as it is written,
# so a run cut short keeps what it finished. From the repository root:
#
#   DATA_DIR=path/to/hf-wikitext OUT=runs/gpu bash benchmarks/gpu_run.sh
#
# DATA_DIR: WikiText-2 in the Hugging Face layout (the bench and the rehearsal read it).
# OUT: where logs and results go (default runs/gpu). BUDGET: seconds in all (default 570).
# STEPS: any of tests gptq bench gemv rehearsal (default all five, in that order).
# CHAPTERS: the rehearsal's chapters (default all). LABEL: the run's label (default the commit).
# CONFIG: the shapes of gptq_speed.py and gemv_speed.py (default qwen2-0.5b).
# MODEL: the 0.5B folder (default runs/qwen2-0.5b-random, written on first use; TOKENIZER_FROM
# copies the tokenizer of an earlier such folder instead of training one). WHEELS: a folder of
# wheels to install first, without dependencies (for a machine that reaches no package index).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-runs/gpu}
BUDGET=${BUDGET:-570}
STEPS=${STEPS:-tests gptq bench gemv rehearsal}
LABEL=${LABEL:-$(git rev-parse --short HEAD 2>/dev/null || echo local)}
MODEL=${MODEL:-runs/qwen2-0.5b-random}
CONFIG=${CONFIG:-qwen2-0.5b}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
say() { echo "[gpu_run $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/gpu_run.log"; }

if [ -n "${WHEELS:-}" ]; then
  pip install -q --no-index --no-deps "$WHEELS"/*.whl >> "$OUT/gpu_run.log" 2>&1 || say "some wheels did not install"
fi
python - <<'PY' 2>&1 | tee -a "$OUT/gpu_run.log"
import importlib, torch
missing = [m for m in ("triton", "transformers", "nbclient", "ipykernel", "coremltools") if importlib.util.find_spec(m) is None]
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "| missing:", missing or "nothing")
PY
if [ -z "${DATA_DIR:-}" ]; then say "DATA_DIR (WikiText-2 in the Hugging Face layout) is not set: the bench and the rehearsal need it"; fi

fits() {  # name, minimum seconds it needs: is there time left for it?
  if [ "$(left)" -lt "$2" ]; then say "skip $1: $(left) s left, it needs about $2"; return 1; fi
}

run_step() {  # name, minimum seconds it needs, command...
  local name=$1 need=$2; shift 2
  fits "$name" "$need" || return 0
  say "start $name"
  timeout "$(left)" "$@" > "$OUT/$name.log" 2>&1
  say "end $name: exit $? ($(tail -1 "$OUT/$name.log" | cut -c1-160))"
}

make_model() {
  [ -f "$MODEL/config.json" ] && return 0
  if [ -z "${DATA_DIR:-}" ]; then say "no model folder $MODEL and no DATA_DIR to train its tokenizer on"; return 1; fi
  python scripts/rehearse.py --make-model "$MODEL" --data-dir "$DATA_DIR" \
    ${TOKENIZER_FROM:+--tokenizer-from "$TOKENIZER_FROM"} >> "$OUT/gpu_run.log" 2>&1
}

for step in $STEPS; do
  case $step in
    tests)
      run_step tests 60 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_fast_decode.py \
        tests/test_gptq.py tests/test_head.py tests/test_palettize.py ;;
    gptq)
      run_step gptq 30 python benchmarks/gptq_speed.py --config "$CONFIG" --out "$OUT/gptq_speed_$CONFIG.csv" ;;
    bench)
      fits bench 150 && make_model && run_step bench 150 python -m qtutor bench --model "$MODEL" --dataset wikitext2 \
        --data-dir "$DATA_DIR" --device cuda --methods all --out "$OUT/bench_qwen2_0.5b" --overwrite ;;
    gemv)
      run_step gemv 40 python benchmarks/gemv_speed.py --config "$CONFIG" --out "$OUT/gemv_speed_$CONFIG.csv" ;;
    rehearsal)
      fits rehearsal 120 && make_model && run_step rehearsal 120 python scripts/rehearse.py --model "$MODEL" --dataset wikitext2 \
        --data-dir "$DATA_DIR" --device cuda ${CHAPTERS:+--chapters $CHAPTERS} --label "$LABEL" \
        --out "$OUT/rehearsal_qwen2-0.5b" ;;
    *) say "unknown step $step (tests gptq bench gemv rehearsal)" ;;
  esac
done
say "done"
