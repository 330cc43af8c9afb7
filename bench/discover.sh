#!/usr/bin/env bash
# Issue 21: discovery of many GGUF files at start, and GET /api/tags over them.
# Makes N sparse files (default 1000) that each hold a real model's header (the first
# HEADER_MIB MiB of LLAMA_MODEL_SMOL, else LLAMA_MODEL) and the model's full size as a hole, then
#   - times `llmvisor models --json` (one discovery pass, printing every model),
#   - starts `llmvisor serve` on them and times from exec to /healthz answering,
#   - times ROUNDS GET /api/tags (median and p95).
# Goals: start < 1 s, tags < 10 ms.
#   set -a; eval "$(scripts/setup-llama.sh)"; set +a; bench/discover.sh
# Knobs: N, HEADER_MIB, ROUNDS, LLMVISOR_BIN (default target/debug/llmvisor: say which build you measured).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
HEADER_MIB=${HEADER_MIB:-4}
ROUNDS=${ROUNDS:-200}
BIN=${LLMVISOR_BIN:-target/debug/llmvisor}
MODEL=${LLAMA_MODEL_SMOL:-${LLAMA_MODEL:?set LLAMA_MODEL: see scripts/setup-llama.sh}}
SERVER=${LLAMA_SERVER:?set LLAMA_SERVER}
[[ -x $BIN ]] || cargo build -q -p llmvisor --bin llmvisor
dir=$(mktemp -d /tmp/llmvisor-bench-discover.XXXXXX)
pid=
cleanup() {
    if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf -- "$dir"
}
trap cleanup EXIT
size=$(stat -c %s "$MODEL")
mkdir -p "$dir/models"
head -c $((HEADER_MIB << 20)) "$MODEL" >"$dir/header"
for i in $(seq -w 1 "$N"); do
    f="$dir/models/model-$i.gguf"
    cp "$dir/header" "$f"
    truncate -s "$size" "$f"
done
rm "$dir/header"
cat >"$dir/llmvisor.toml" <<TOML
listen = "127.0.0.1:0"
state_dir = "$dir/state"
models_dirs = ["$dir/models"]
discover = []
llama_server = "$SERVER"
TOML
echo "# discovery of $N sparse GGUF files ($(du -sh "$dir/models" | cut -f1) on disk, $((size >> 20)) MiB each apparent), binary $BIN"
sync
t0=$(date +%s.%N)
n=$("$BIN" models --config "$dir/llmvisor.toml" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["models"]))')
t1=$(date +%s.%N)
printf '| `llmvisor models --json` (%s models) | %.0f ms |\n' "$n" "$(echo "($t1 - $t0) * 1000" | bc)"
log="$dir/serve.log"
t0=$(date +%s.%N)
"$BIN" serve --config "$dir/llmvisor.toml" 2>"$log" &
pid=$!
addr=
while [[ -z $addr ]]; do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$log" | head -1 | sed 's/listening on //') || true
    kill -0 "$pid" || { cat "$log"; exit 1; }
    # Not a busy loop: on 2 cores a polling loop of forks would take the daemon's CPU.
    sleep 0.005
done
until curl -fsS "$addr/healthz" >/dev/null 2>&1; do sleep 0.005; done
t1=$(date +%s.%N)
printf '| serve: exec to /healthz 200 | %.0f ms |\n' "$(echo "($t1 - $t0) * 1000" | bc)"
python3 - "$addr" "$ROUNDS" <<'PY'
import json, statistics, sys, time, urllib.request
url, rounds = sys.argv[1] + "/api/tags", int(sys.argv[2])
times = []
for _ in range(rounds):
    t = time.perf_counter()
    body = urllib.request.urlopen(url).read()
    times.append((time.perf_counter() - t) * 1000)
n = len(json.loads(body)["models"])
times.sort()
print(f"| GET /api/tags ({n} models, {len(body) >> 10} KiB) | median {statistics.median(times):.2f} ms, p95 {times[int(len(times) * 0.95)]:.2f} ms |")
PY
