#!/usr/bin/env bash
# A screenshot of the MLflow UI's experiment page (the runs table), as a user would see it after
# `rlhf run`: starts `mlflow ui` on 127.0.0.1 for the project's mlflow.db, opens the experiment in
# headless Chromium (Debian: apt-get install chromium), writes a PNG and stops the server again.
#
#   scripts/mlflow_screenshot.sh [PROJECT_DIR] [OUT.png] [EXPERIMENT]
#
# PROJECT_DIR defaults to ., OUT.png to mlflow_runs.png, EXPERIMENT to rlhf-pipeline.
# Environment: PYTHON (default .venv/bin/python, else python), CHROMIUM (default chromium),
# MLFLOW_SCREENSHOT_PORT (default 5055), MLFLOW_SCREENSHOT_SIZE (default 2200,1000).
set -euo pipefail

project=$(cd "${1:-.}" && pwd)
out=$(realpath -m "${2:-mlflow_runs.png}")
experiment=${3:-rlhf-pipeline}
port=${MLFLOW_SCREENSHOT_PORT:-5055}
size=${MLFLOW_SCREENSHOT_SIZE:-2200,1000}
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
chromium=${CHROMIUM:-chromium}

[ -f "$project/mlflow.db" ] || { echo "error: no $project/mlflow.db (run the pipeline first)" >&2; exit 2; }
command -v "$chromium" >/dev/null || { echo "error: $chromium not found (apt-get install -y chromium)" >&2; exit 2; }

tmp=$(mktemp -d)
export MLFLOW_DISABLE_TELEMETRY=true
setsid "$python" -m mlflow ui --backend-store-uri "sqlite:///$project/mlflow.db" --host 127.0.0.1 --port "$port" \
  >"$tmp/server.log" 2>&1 &
server=$!
cleanup() { kill -- "-$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

api="http://127.0.0.1:$port"
for _ in $(seq 120); do
  "$python" -c "import urllib.request as u; u.urlopen('$api/health', timeout=2)" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
  sleep 1
done
exp_id=$("$python" - "$api" "$experiment" <<'PY'
import json, sys, urllib.parse, urllib.request
api, name = sys.argv[1], sys.argv[2]
url = f"{api}/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name})
print(json.load(urllib.request.urlopen(url, timeout=10))["experiment"]["experiment_id"])
PY
)
page="$api/#/experiments/$exp_id/runs?viewStateShareKey=headline"  # the pipeline's headline columns (tasks/parent_run.py)
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$tmp/chromium" \
  --window-size="$size" --virtual-time-budget=20000 --screenshot="$out" "$page" >"$tmp/chromium.log" 2>&1 \
  || { cat "$tmp/chromium.log" >&2; exit 1; }
echo "wrote $out ($page)"
