#!/usr/bin/env bash
# Labeler benchmarks on a GPU, as one prepared script (issue 3).
#
#   bash bench/gpu.sh               # on a machine with a CUDA GPU and this repo checked out (< 5 minutes)
#   bash bench/gpu.sh --cpu-smoke   # tiny sizes on CPU: checks this script end to end (~2 minutes)
#
# Runs bench/gpu_pipeline.py (the CLIs end to end: text and chat labeling in bf16, a
# two-stage student, the teacher writing responses to the chat prompts and labeling them), bench/trainer_gpu.py (trainer step time, tiny and 135M students,
# bf16, tail-kl vs ce), bench/labeler_overhead.py (labeler vs bare forward; a random-weight
# SmolLM2-135M-shaped teacher and a Llama-3.2-1B-shaped one: a GPU machine
# usually cannot download the real weights, and throughput does not depend on
# their values) and bench/labeler_memory.py (chunked head vs full logits),
# writes each one's table (.txt) and figures (.json) to ${OUT:-bench-out}/ and
# prints them at the end. A step that fails is reported and the others still run;
# the exit status is non-zero if any failed.
#
# Python, in this order:
#   1. $PYTHON, if set;
#   2. .venv/bin/python, if its torch is usable here (sees a GPU, unless --cpu-smoke);
#   3. the machine's own python3, if its torch is usable: GPU images ship a CUDA
#      torch that a fresh venv would not see (a venv made from inside another
#      venv with --system-site-packages gets the base interpreter's packages,
#      not that venv's), and pip there may have no network. Nothing is installed:
#      the checkout goes on PYTHONPATH.
#   4. otherwise `make venv` (needs the package registry; on a GPU machine with
#      network access PyPI's Linux torch wheel is a CUDA build).
# Needed: torch, transformers, numpy, pyarrow, fsspec. Optional: s3fs and the
# `weed` binary (else the overhead benchmark writes its shards to local disk).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=cpu-smoke ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "usage: bash bench/gpu.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
OUTDIR=${OUT:-bench-out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = gpu ]; then
  PROBE='import torch, transformers, numpy, pyarrow, fsspec; assert torch.cuda.is_available(), "no GPU visible"'
else
  PROBE='import torch, transformers, numpy, pyarrow, fsspec'
fi
usable() { [ -n "$1" ] && "$1" -c "$PROBE" >/dev/null 2>&1; }

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif usable .venv/bin/python; then
  PY=.venv/bin/python
elif usable "$(command -v python3 || true)"; then
  PY=$(command -v python3)
else
  echo "== no Python with a usable torch here: make venv" >&2
  make venv
  PY=.venv/bin/python
fi
if ! "$PY" -c "$PROBE"; then
  echo "gpu.sh: $PY cannot run the benchmarks (see the error above)" >&2
  exit 1
fi

# The overhead benchmark writes to a local SeaweedFS when it can, else to local disk.
if "$PY" -c 'import s3fs' >/dev/null 2>&1 && { [ -x "$(dirname "$PY")/weed" ] || command -v weed >/dev/null; }; then
  STORE=seaweedfs
else
  STORE_DIR=$(mktemp -d)
  trap 'rm -rf "$STORE_DIR"' EXIT
  STORE="$STORE_DIR/labels"
fi

if [ "$MODE" = gpu ]; then
  DEV=(--device cuda)
  OVERHEAD_RUNS=(
    "smollm2 --teacher random:smollm2-135m --sequences 256 --length 1024 --batch-tokens 16384 --repeats 3"
    "llama1b --teacher random:llama-1b --sequences 128 --length 1024 --batch-tokens 16384 --repeats 3"
  )
  MEMORY_ARGS=(--vocabs 32000,128000,256000 --shapes 1x1024,8x1024,8x4096,32x4096 --max-gib 60)
  PIPELINE_ARGS=(--preset llama-1b --sequences 512 --steps 100)
  TRAINER_ARGS=(--device cuda --precision bf16)
  STEP_TIMEOUT=${STEP_TIMEOUT:-150}
else
  DEV=(--device cpu)
  OVERHEAD_RUNS=("tiny --teacher random:tiny --sequences 8 --length 64 --batch-tokens 256 --repeats 2")
  MEMORY_ARGS=(--vocabs 1000,4000 --shapes 1x64,2x128 --head-chunk 64)
  PIPELINE_ARGS=(--preset tiny --sequences 32 --steps 3 --max-new-tokens 8)
  TRAINER_ARGS=(--cpu-smoke)
  STEP_TIMEOUT=${STEP_TIMEOUT:-300}
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $MODE; python: $PY; storage: $STORE"
  git log -1 --format='commit: %H %s' 2>/dev/null || true
  "$PY" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

FAILED=()
step() {  # step NAME COMMAND...: run with a time limit, keep its output, never stop the script
  local name=$1; shift
  echo "== $name: $*"
  if timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUTDIR/$name.log"; then :; else FAILED+=("$name"); fi
}
set +e
set -o pipefail
for run in "${OVERHEAD_RUNS[@]}"; do
  read -r name args <<<"$run"
  # shellcheck disable=SC2086  # args is a list of flags on purpose
  step "overhead-$name" "$PY" bench/labeler_overhead.py "${DEV[@]}" $args --output "$STORE" \
    --json "$OUTDIR/overhead-$name.json"
done
step memory "$PY" bench/labeler_memory.py "${DEV[@]}" "${MEMORY_ARGS[@]}" --json "$OUTDIR/memory.json"
# The whole path through the CLIs: text (packed) and chat labeling in bf16, two-stage students (needs Ray).
step pipeline "$PY" bench/gpu_pipeline.py "${DEV[@]}" "${PIPELINE_ARGS[@]}"
# Trainer step time: tiny and 135M-parameter students, bf16, tail-kl vs ce (issue 21).
step trainer "$PY" bench/trainer_gpu.py "${TRAINER_ARGS[@]}"

# Keep the tables of each step that ran (a failed step keeps its whole .log).
echo
echo "================ results ($OUTDIR) ================"
cat "$OUTDIR/env.txt"
for f in "$OUTDIR"/*.log; do
  name=$(basename "$f" .log)
  if [[ " ${FAILED[*]} " == *" $name "* ]]; then
    echo; echo "---- $name FAILED: last lines of $f"; tail -n 40 "$f"
  else
    sed -n '/^device: /,$p' "$f" > "$OUTDIR/$name.txt"
    rm -f "$f"
    echo; echo "---- $name.txt"; cat "$OUTDIR/$name.txt"
  fi
done
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: failed: ${FAILED[*]}" >&2
  exit 1
fi
