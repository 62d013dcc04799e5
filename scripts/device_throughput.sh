#!/usr/bin/env bash
# The throughput check of one device call (at most ~6 minutes on one H100/H200): the reference
# clean loop and `python -m bunny.bench.throughput` at the same settings on the same GPU, then
# their ratio per stage and the fast profile's gain (bunny.bench.compare).
#
#   on the device:  carry [".gpu-wheels"]; command: bash scripts/device_throughput.sh
#   here, CPU:      bash scripts/device_throughput.sh --tiny    (logic check, tiny shapes, ~6 min)
#
# Only the checkout travels to the device, so the clean loop runs from scripts/clean_loop.py, a
# verbatim copy of ../shared/reference/clean_loop.py (checked against it wherever ../shared
# exists). deepspeed comes from .gpu-wheels/ (cp -r ../shared/device/wheels .gpu-wheels) when it
# is not installed. Order of the runs, most important first, each started only while the time
# budget (BUDGET_S, default 330 s; 1500 s with --tiny) allows: models, clean loop (checkpointing
# on), our tutorial-settings stages and fast stages, clean loop --no-ckpt, the LoRA stage with
# ZeRO-3's per-module hooks (as before bunny/train/zero3.py), the unfrozen-tower stages.
# Writes clean.jsonl, bunny.jsonl, summary.json and logs/ under $OUT (a temporary folder when
# unset), prints the summary, and exits 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
TINY=""  # "--tiny" or nothing; used unquoted so that nothing adds no argument
if [[ "${1:-}" == "--tiny" ]]; then TINY=--tiny; fi
BUDGET_S=${BUDGET_S:-$([[ -n $TINY ]] && echo 1500 || echo 330)}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
CACHE=${BUNNY_BENCH_CACHE:-/tmp/bunny-bench-cache}
CLEAN=scripts/clean_loop.py
mkdir -p "$OUT/logs"
t0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - t0))); }
say() { echo "[device_throughput +$((SECONDS - t0))s] $*" >&2; }

if ! python3 -c "import deepspeed" 2>/dev/null; then
  [[ -d .gpu-wheels ]] || { say "deepspeed is not installed and there is no .gpu-wheels/ to install it from"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
  say "installed the carried wheels"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PREFECT_HOME=/tmp/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -f ../shared/reference/clean_loop.py ]] && ! cmp -s ../shared/reference/clean_loop.py "$CLEAN"; then
  say "$CLEAN differs from ../shared/reference/clean_loop.py: copy it again"; exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/logs/gpu.csv"

FAILED=0
bench() {  # bench STAGES BUDGET: our benchmark, appending to bunny.jsonl
  python3 -m bunny.bench.throughput $TINY --stages "$1" --time-budget "$2" --cache-dir "$CACHE" \
    --work-dir "$WORK" --json-out "$OUT/bunny.jsonl" > /dev/null 2>> "$OUT/logs/bench.log" \
    || { rc=$?; FAILED=1; say "benchmark of $1 exited with $rc: see logs/ and the rows of bunny.jsonl"; }
}
clean() {  # clean [--no-ckpt]: the ceiling, appending to clean.jsonl
  timeout "$(left)" python3 "$CLEAN" $TINY "$@" >> "$OUT/clean.jsonl" 2>> "$OUT/logs/clean.log" \
    || { rc=$?; FAILED=1; say "clean loop $* stopped (exit $rc): see logs/clean.log"; }
}

python3 -m bunny.bench.throughput $TINY --prepare-only --cache-dir "$CACHE" > /dev/null 2>> "$OUT/logs/bench.log" \
  || { say "building the models failed: see logs/bench.log"; tail -20 "$OUT/logs/bench.log" >&2; exit 1; }
say "models ready"
touch "$OUT/clean.jsonl" "$OUT/bunny.jsonl"
clean
say "clean loop (checkpointing on) done"
bench pretrain,lora,lora_fast,pretrain_fast $(($(left) - 70))
say "tutorial and fast stages done"
if (($(left) > 70)); then clean --no-ckpt; say "clean loop --no-ckpt done"; fi
if (($(left) > 60)); then bench lora_module_hooks,lora_unfrozen,lora_unfrozen_fast "$(left)"; say "per-module ZeRO-3 and unfrozen-tower stages done"; fi
for log in "$WORK"/*/train.log; do cp "$log" "$OUT/logs/$(basename "$(dirname "$log")").log"; done 2>/dev/null
python3 -m bunny.bench.compare "$OUT/clean.jsonl" "$OUT/bunny.jsonl" --json-out "$OUT/summary.json" || FAILED=1
say "done: results in $OUT"
exit $FAILED
