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
WORK=$(mktemp -d /tmp/hmoe-e2e-XXXX)
RUN_DIR=${RUN_DIR:-$WORK/run}
export HMOE_DATA_DIR=${HMOE_DATA_DIR:-$ROOT/.hmoe/data}  # absolute: the job runs in a copy of the repo

setsid "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus 2 --num-gpus 0 \
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

START=$(date +%s)
"$BIN/ray" job submit --address "$ADDR" --working-dir . \
    --runtime-env-json '{"excludes": [".venv", ".hmoe", "runs", ".git", "bench/results"], "env_vars": {"HMOE_DATA_DIR": "'"$HMOE_DATA_DIR"'"}}' \
    -- hmoe train --preset tiny --run-dir "$RUN_DIR"
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
