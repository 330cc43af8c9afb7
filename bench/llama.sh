#!/usr/bin/env bash
# bench/llama.sh — issue 4's benchmark: llmvisor vs llama.cpp's own router mode vs llama-server
# started by hand, with the real llama-server and the real Gemma 3 270M model (scripts/setup-llama.sh),
# on the same machine, in the same run, with the same server settings everywhere:
#   --host 127.0.0.1 --log-colors off --alias NAME $LLAMA_ARGS --model DIR/NAME.gguf
# (the router passes exactly these to its children; checked in the children's command lines).
#
# Measured, each variant side by side, the order rotating from round to round:
#   1. cold start: request for a model that is not loaded → first byte of the answer
#      (a chat completion with max_tokens 1, on a fresh connection):
#        direct    spawn llama-server, poll GET /health every $POLL_MS ms until 200, then send it
#        llmvisor  POST /v1/chat/completions to the daemon (unloaded between rounds)
#        router    POST /v1/chat/completions to `llama-server --models-dir DIR --models-max 2`
#                  (POST /models/unload between rounds, waiting until its child has exited)
#      Only one llama-server runs during a cold measurement; each is stopped right after it.
#   2. hot latency on a keep-alive connection per variant, requests interleaved one by one:
#      a chat completion (max_tokens 1, same prompt: the KV cache makes it a ~1-token job), and a
#      small proxied GET (/props: direct /props, llmvisor /upstream/NAME/props, router
#      /props?model=NAME — the router proxies that one to its child).
#   3. wrk throughput of GET /health (router: answered by the router itself, it proxies no
#      /health) and GET /props (proxied by all), at each connection count in $CONNS.
#   4. VmRSS of llmvisor's daemon and of the router process (their children not included).
#
# Usage: bench/llama.sh       (prints Markdown tables; raw data stays in the run directory)
# Environment:
#   ROUNDS=5         rounds of the hot-latency and wrk measurements
#   COLD_ROUNDS=9    rounds of the cold-start measurement (the noisiest one)
#   DURATION=5       seconds per wrk run
#   CONNS="1 16"     wrk connection counts
#   POLL_MS=10       health poll interval of the direct variant
#   CHAT_N=40 PROPS_N=200   hot requests per variant per round
#   LLAMA_ARGS="--ctx-size 1024 --parallel 1 --threads 1"
#   SKIP_BUILD=1     use the existing target/release binaries without running cargo
#   LLMVISOR_BIN_DIR=DIR  take llmvisor and fake-llm from DIR (LLMVISOR_VERSION=text names it)
#   BENCH_WORK=DIR   run directory (default: a new /tmp/llmvisor-bench-llama.XXXXXX)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS=${ROUNDS:-5}
COLD_ROUNDS=${COLD_ROUNDS:-9}
DURATION=${DURATION:-5}
CONNS=${CONNS:-"1 16"}
POLL_MS=${POLL_MS:-10}
CHAT_N=${CHAT_N:-40}
PROPS_N=${PROPS_N:-200}
LLAMA_ARGS=${LLAMA_ARGS:-"--ctx-size 1024 --parallel 1 --threads 1"}
WORK=${BENCH_WORK:-$(mktemp -d /tmp/llmvisor-bench-llama.XXXXXX)}
mkdir -p "$WORK/raw" "$WORK/models"
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_command python3
ensure_command wrk
build_llmvisor
log "scripts/setup-llama.sh (cached after the first run)"
eval "$("$REPO/scripts/setup-llama.sh")"
[[ -x ${LLAMA_SERVER:-} && -f ${LLAMA_MODEL:-} ]] || die "setup-llama.sh gave no server/model"
RESULTS=$WORK/results.jsonl
EXTRA=$WORK/extra.jsonl
: >"$RESULTS"
: >"$EXTRA"
MACHINE=$(machine_info)
log "run directory: $WORK"
log "machine: $MACHINE"

NAME=$(basename "$LLAMA_MODEL" .gguf)
ln -sf "$LLAMA_MODEL" "$WORK/models/$NAME.gguf"
MODEL_PATH=$WORK/models/$NAME.gguf
read -r -a EXTRA_ARGS <<<"$LLAMA_ARGS"
SERVER_ARGS=(--host 127.0.0.1 --log-colors off --alias "$NAME" "${EXTRA_ARGS[@]}" --model "$MODEL_PATH")

read -r P_DIRECT P_DAEMON P_ROUTER <<<"$("${BENCH_PY[@]}" ports 3)"
read -r P_LO P_HI <<<"$("${BENCH_PY[@]}" port-range 20)"

toml_array() { # JSON strings are valid TOML basic strings for these paths and flags
    python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"
}
# shellcheck disable=SC2016 # ${PORT} is llmvisor's macro, not a shell expansion
LV_CMD=$(toml_array "$LLAMA_SERVER" "${SERVER_ARGS[@]}" --port '${PORT}')
cat >"$WORK/llmvisor.toml" <<EOF
listen = "127.0.0.1:$P_DAEMON"
state_dir = "$WORK/state"
port_range = [$P_LO, $P_HI]

[defaults]
ttl = "0"
startup_timeout = "120s"

[models."$NAME"]
cmd = $LV_CMD
EOF
"$LLMVISOR" check --config "$WORK/llmvisor.toml" >&2 || die "config rejected"
DIRECT_CMD=$(toml_array "$LLAMA_SERVER" "${SERVER_ARGS[@]}" --port "$P_DIRECT")

start_bg "$WORK/daemon.log" "$LLMVISOR" serve --config "$WORK/llmvisor.toml"
DAEMON_PID=$BG_PID
start_bg "$WORK/router.log" "$LLAMA_SERVER" --models-dir "$WORK/models" --models-max 2 \
    --host 127.0.0.1 --port "$P_ROUTER" --log-colors off "${EXTRA_ARGS[@]}"
ROUTER_PID=$BG_PID
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DAEMON/healthz" 30 || die "llmvisor did not start"
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_ROUTER/health" 30 || die "router did not start"
sleep 1
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "idle after start, model configured, not loaded" >/dev/null
"${BENCH_PY[@]}" rss "$ROUTER_PID" --record "$EXTRA" --process "llama.cpp router" \
    --when "idle after start, model found in --models-dir, not loaded" >/dev/null
log "llmvisor pid $DAEMON_PID :$P_DAEMON; router pid $ROUTER_PID :$P_ROUTER; direct port $P_DIRECT; model $NAME"

COMMON_PY=(--model "$NAME" --direct-cmd "$DIRECT_CMD" --direct-port "$P_DIRECT"
    --direct-log "$WORK/direct.log" --llmvisor-port "$P_DAEMON" --router-port "$P_ROUTER"
    --router-pid "$ROUTER_PID" --router-log "$WORK/router.log" --rounds "$ROUNDS" --poll-ms "$POLL_MS")

log "1/3 cold starts: $COLD_ROUNDS rounds × {direct, llmvisor, router}"
"${BENCH_PY[@]}" cold --out "$RESULTS" "${COMMON_PY[@]}" --rounds "$COLD_ROUNDS"

log "2/3 hot latency: $ROUNDS rounds × ($CHAT_N chat + $PROPS_N GET /props) per variant"
start_bg "$WORK/direct-hot.log" "$LLAMA_SERVER" "${SERVER_ARGS[@]}" --port "$P_DIRECT"
DIRECT_PID=$BG_PID
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DIRECT/health" 120 || die "direct llama-server did not start"
"${BENCH_PY[@]}" hot --out "$RESULTS" "${COMMON_PY[@]}" --chat-n "$CHAT_N" --props-n "$PROPS_N"

LV_CHILD=$("${BENCH_PY[@]}" http GET "http://127.0.0.1:$P_DAEMON/api/models/$NAME" --field pid)
RT_CHILD=$("${BENCH_PY[@]}" children "$ROUTER_PID")
[[ $LV_CHILD =~ ^[0-9]+$ && $RT_CHILD =~ ^[0-9]+$ ]] || die "children: llmvisor '$LV_CHILD' router '$RT_CHILD'"
for pid in "$DIRECT_PID" "$LV_CHILD" "$RT_CHILD"; do
    log "server pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
done

url_of() {
    case "$1/$2" in
    health/direct) echo "http://127.0.0.1:$P_DIRECT/health" ;;
    health/llmvisor) echo "http://127.0.0.1:$P_DAEMON/upstream/$NAME/health" ;;
    health/router) echo "http://127.0.0.1:$P_ROUTER/health" ;;
    props/direct) echo "http://127.0.0.1:$P_DIRECT/props" ;;
    props/llmvisor) echo "http://127.0.0.1:$P_DAEMON/upstream/$NAME/props" ;;
    props/router) echo "http://127.0.0.1:$P_ROUTER/props?model=$NAME" ;;
    esac
}
cpu_args() {
    case "$1" in
    direct) echo "--cpu upstream=$DIRECT_PID" ;;
    llmvisor) echo "--cpu daemon=$DAEMON_PID --cpu upstream=$LV_CHILD" ;;
    router) echo "--cpu router=$ROUTER_PID --cpu upstream=$RT_CHILD" ;;
    esac
}
run_wrk() { # ROUND GROUP CONNS VARIANT [SECONDS]
    local round=$1 group=$2 c=$3 v=$4 d=${5:-$DURATION} t=2
    ((c < 2)) && t=1
    # shellcheck disable=SC2046
    "${BENCH_PY[@]}" wrk --out "$RESULTS" --raw "$WORK/raw/r$round-$group-c$c-$v.txt" \
        --meta kind=wrk --meta "round=$round" --meta "group=GET /$group" \
        --meta "conns=$c" --meta "variant=$v" $(cpu_args "$v") \
        -- wrk -t"$t" -c"$c" -d"${d}s" --latency "$(url_of "$group" "$v")"
}
rotated() {
    local k=$1
    shift
    local a=("$@") n=$#
    for ((i = 0; i < n; i++)); do echo "${a[(i + k) % n]}"; done
}

log "3/3 wrk: $ROUNDS rounds × conns {$CONNS} × {GET /health, GET /props} × {direct, llmvisor, router}, ${DURATION}s each"
for g in health props; do
    for v in direct llmvisor router; do RESULTS=/dev/null run_wrk warm "$g" 16 "$v" 1 >/dev/null; done
done
rm -f "$WORK"/raw/rwarm-*
for ((r = 0; r < ROUNDS; r++)); do
    log "wrk round $((r + 1))/$ROUNDS (load average $(cut -d' ' -f1 /proc/loadavg))"
    for c in $CONNS; do
        for g in health props; do
            for v in $(rotated "$r" direct llmvisor router); do run_wrk "$r" "$g" "$c" "$v"; done
        done
    done
done

sleep 1
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "model loaded, after all requests" >/dev/null
"${BENCH_PY[@]}" rss "$ROUTER_PID" --record "$EXTRA" --process "llama.cpp router" \
    --when "model loaded, after all requests" >/dev/null
for x in "direct:$DIRECT_PID" "llmvisor's child:$LV_CHILD" "router's child:$RT_CHILD"; do
    "${BENCH_PY[@]}" rss "${x#*:}" --record "$EXTRA" --process "llama-server (${x%%:*}), for scale" \
        --when "model loaded, after all requests" >/dev/null
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "Machine: $MACHINE; load average at the end: $LOAD_END."
    echo
    echo "Settings: ROUNDS=$ROUNDS COLD_ROUNDS=$COLD_ROUNDS DURATION=${DURATION}s CONNS=\"$CONNS\" POLL_MS=$POLL_MS CHAT_N=$CHAT_N PROPS_N=$PROPS_N;" \
        "llama-server $("$LLAMA_SERVER" --version 2>&1 | grep -m1 -o 'build [0-9]*'), model $NAME," \
        "server flags: \`${SERVER_ARGS[*]/#$WORK/…}\`."
    echo
    "${BENCH_PY[@]}" report-llama "$RESULTS" --extra "$EXTRA" --poll-ms "$POLL_MS"
} | tee "$WORK/report.md"

cleanup
rm -rf "${WORK:?}/bin"
log "raw data and report: $WORK"
