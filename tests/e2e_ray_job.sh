#!/usr/bin/env bash
# End-to-end CI check: a private Ray head on 127.0.0.1, `ray job submit -- hmoe train --preset tiny`,
# then the run directory must hold five expert checkpoints and a report.
#
# The head runs in its own session (setsid) with its own temp dir and ports, and is stopped by
# killing that session only: `ray stop` would stop every Ray cluster of this user on the machine.
# Loopback only, so token authentication is disabled (RAY_AUTH_MODE=disabled on head and client).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/.venv/bin}
export PATH=$BIN:$PATH RAY_AUTH_MODE=disabled
unset RAY_ADDRESS

free_port() { "$BIN/python" - "$1" <<'PY'
import socket, sys
p = int(sys.argv[1])
while True:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); print(p); break
        except OSError:
            p += 1
PY
}
GCS_PORT=$(free_port 6390)
DASH_PORT=$(free_port 8265)
AGENT_PORT=$(free_port 52366)  # Ray's default 52365 is another cluster's on a shared host
CLIENT_PORT=$(free_port 9901)  # below the worker ports (10002-19999)
WORK=$(mktemp -d /tmp/hmoe-e2e-XXXX)
RUN_DIR=${RUN_DIR:-$WORK/run}
export HMOE_DATA_DIR=${HMOE_DATA_DIR:-$ROOT/.hmoe/data}  # absolute: the job runs in a copy of the repo

setsid "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --num-cpus 2 --num-gpus 0 \
    --include-dashboard true --temp-dir "$WORK/ray" --disable-usage-stats >"$WORK/head.log" 2>&1 &
HEAD_PID=$!
stop_head() {
    kill -TERM -- "-$HEAD_PID" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 -- "-$HEAD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$HEAD_PID" 2>/dev/null || true
}
trap stop_head EXIT

ADDR=http://127.0.0.1:$DASH_PORT
for _ in $(seq 90); do
    curl -sf "$ADDR/api/version" >/dev/null 2>&1 && break
    kill -0 "$HEAD_PID" 2>/dev/null || { cat "$WORK/head.log"; echo "ray head died" >&2; exit 1; }
    sleep 1
done
echo "ray head up at $ADDR (gcs 127.0.0.1:$GCS_PORT); run dir $RUN_DIR"

# The dashboard answers before the node's job agent has registered; until then a submission is
# refused ("No available agent to submit job") and no job exists, so it is safe to submit again.
START=$(date +%s)
JOB=hmoe-e2e-$$
for attempt in $(seq 30); do
    if OUT=$("$BIN/ray" job submit --address "$ADDR" --working-dir . --no-wait --submission-id "$JOB" \
        --runtime-env-json '{"excludes": [".venv", ".hmoe", "runs", ".git", "bench/results"], "env_vars": {"HMOE_DATA_DIR": "'"$HMOE_DATA_DIR"'"}}' \
        -- hmoe train --preset tiny --run-dir "$RUN_DIR" 2>&1); then
        break
    fi
    if ! grep -q "No available agent" <<<"$OUT" || [ "$attempt" = 30 ]; then
        echo "$OUT" >&2
        tail -n 30 "$WORK"/ray/session_latest/logs/dashboard_agent.log 2>/dev/null >&2 || true
        exit 1
    fi
    echo "the job agent is not up yet (attempt $attempt); submitting again in 2s"
    sleep 2
done
"$BIN/ray" job logs --address "$ADDR" --follow "$JOB"
for _ in $(seq 30); do  # the logs end with the job; its status can follow a moment later
    STATUS=$("$BIN/ray" job status --address "$ADDR" "$JOB" 2>&1)
    grep -q "succeeded" <<<"$STATUS" && break
    grep -qE "failed|was stopped" <<<"$STATUS" && break
    sleep 1
done
grep -q "succeeded" <<<"$STATUS" || { echo "$STATUS" >&2; exit 1; }
echo "job finished in $(( $(date +%s) - START ))s"

"$BIN/python" - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
from experts.checkpoint import read_meta
from router.domains import DOMAINS
run = Path(sys.argv[1])
for d in DOMAINS:
    read_meta(run / "experts" / d, kind="lm")
rep = json.loads((run / "report" / "report.json").read_text())
assert set(DOMAINS) <= set(rep["matrix"]), rep["matrix"].keys()
assert all(set(DOMAINS) <= set(rep["matrix"][d]) for d in DOMAINS)
print(f"e2e ok: 5 expert checkpoints and a {len(rep['matrix'])}x{len(rep['domains'])} report in {run}")
PY
