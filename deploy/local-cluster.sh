#!/usr/bin/env bash
# Rehearse the cluster labeling job on one machine: a multi-node Ray cluster (a head and
# worker nodes, each with its own resources), the labeling job submitted with
# `ray job submit` and the same entrypoint as deploy/kuberay/label-rayjob.yaml
# (`softlabels label ...`), the manifest and every shard's sha256 checked,
# everything torn down by PID. (`softlabels inspect URL` summarizes the set.)
#
#   deploy/local-cluster.sh [--workers N] [--cpus-per-node C] -- LABELER_RUN_FLAGS...
#
# Example, against a local S3 server (e.g. SeaweedFS: `weed mini -dir=/tmp/s3`, with
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL exported):
#
#   deploy/local-cluster.sh --workers 2 -- --teacher smollm2-135m --corpus pydoc \
#       --limit 16 --max-length 64 --output s3://my-bucket/rehearsal
#
# Ray's processes get the environment of this script (S3 credentials included), like
# pods get theirs. Only processes this script started are stopped (found by a marker in
# their environment); other Ray instances on the machine are left alone.
# Python: $PYTHON, else .venv/bin/python, else python3 (it must have the labeler extra).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=2
CPUS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --cpus-per-node) CPUS=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "local-cluster.sh: unknown option $1 (labeler flags go after --)" >&2; exit 2 ;;
  esac
done
LABELER_ARGS=("$@")
OUTPUT=""
for ((i = 0; i < ${#LABELER_ARGS[@]}; i++)); do
  case "${LABELER_ARGS[$i]}" in
    --output) OUTPUT=${LABELER_ARGS[$((i + 1))]:-} ;;
    --output=*) OUTPUT=${LABELER_ARGS[$i]#--output=} ;;
  esac
done
if [ -z "$OUTPUT" ]; then
  echo "local-cluster.sh: pass the labeler's --output after -- (see --help)" >&2
  exit 2
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
BIN=$(cd "$(dirname "$PY")" && pwd)
RAY="$BIN/ray"
[ -x "$RAY" ] || { echo "local-cluster.sh: no ray next to $PY (install the labeler extra)" >&2; exit 2; }
# The job's `softlabels` must be this one: every Ray process inherits this PATH.
export PATH="$BIN:$PATH"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} TOKENIZERS_PARALLELISM=false
unset RAY_ADDRESS

TMP=$(mktemp -d /tmp/slrc.XXXXXX)  # short: Ray's socket paths live under it
export SOFTLABELS_REHEARSAL=$TMP    # marks every process of this cluster (they inherit it)

ours() {  # PIDs whose environment carries our marker, except this script
  "$PY" - "$TMP" "$$" <<'PY'
import os, sys
tag, me = f"SOFTLABELS_REHEARSAL={sys.argv[1]}".encode(), sys.argv[2]
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            if pid not in (me, str(os.getpid())) and tag in fh.read().split(b"\0"):
                print(pid)
    except OSError:
        pass  # gone, or not ours to read
PY
}
teardown() {
  local pids
  pids=$(ours)
  if [ -n "$pids" ]; then
    echo "== teardown: stopping $(echo "$pids" | wc -w) processes by PID"
    # shellcheck disable=SC2086  # a list of PIDs
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 10); do [ -z "$(ours)" ] && break; sleep 0.3; done
    pids=$(ours)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap teardown EXIT

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
DASH=$(free_port)
# Each node's agents need their own ports: on one machine the defaults would collide, and
# the job server would then find no agent to run the job.
node_ports() {
  echo "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
       "--runtime-env-agent-port=$(free_port) --metrics-export-port=$(free_port)"
}

echo "== head node: 127.0.0.1:$PORT (dashboard and job server :$DASH), $CPUS CPU"
# shellcheck disable=SC2046  # node_ports prints separate flags on purpose
"$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --temp-dir="$TMP" --num-cpus="$CPUS" --num-gpus=0 $(node_ports) \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --disable-usage-stats >"$TMP/head.log" 2>&1 \
  || { cat "$TMP/head.log"; exit 1; }
for i in $(seq "$WORKERS"); do
  echo "== worker node $i: $CPUS CPU"
  # shellcheck disable=SC2046
  "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --temp-dir="$TMP" --num-cpus="$CPUS" --num-gpus=0 $(node_ports) \
    --disable-usage-stats >"$TMP/worker-$i.log" 2>&1 || { cat "$TMP/worker-$i.log"; exit 1; }
done

JOB=softlabels-rehearsal-$(date +%s)
echo "== ray job submit ($JOB): softlabels label ${LABELER_ARGS[*]}"
# The job server may answer before its agents are up ("No available agent"): retry for a minute.
for attempt in $(seq 20); do
  if "$RAY" job submit --address "http://127.0.0.1:$DASH" --submission-id "$JOB" --entrypoint-num-cpus 0 --no-wait \
      -- softlabels label "${LABELER_ARGS[@]}" >"$TMP/submit.log" 2>&1; then
    break
  fi
  if [ "$attempt" = 20 ]; then cat "$TMP/submit.log"; exit 1; fi
  sleep 1
done
"$RAY" job logs --address "http://127.0.0.1:$DASH" --follow "$JOB" || true
STATUS=$("$PY" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "http://127.0.0.1:$DASH" "$JOB" 2>/dev/null || true)
echo "== job $JOB: ${STATUS:-UNKNOWN}"
if [ "$STATUS" != SUCCEEDED ]; then
  exit 1
fi

echo "== manifest check: $OUTPUT"
# The manifest is there (the set is published) and every shard it lists matches its size and sha256.
"$PY" - "$OUTPUT" <<'PY'
import sys
import softlabels.schemas as schemas

ls = schemas.open_label_set(sys.argv[1])
for shard in ls.manifest.shards:
    ls.read_shard_bytes(shard, verify=True)
t = ls.manifest.totals
print(f"manifest ok: {len(ls.manifest.shards)} shards verified, {t.sequences} sequences, {t.tokens} tokens, {t.bytes} bytes")
PY
echo "== rehearsal passed: $((WORKERS + 1)) nodes, label set at $OUTPUT"
