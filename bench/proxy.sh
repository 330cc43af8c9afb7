#!/usr/bin/env bash
# bench/proxy.sh — issue 3's benchmark: what llmvisor's proxy hop costs against a fast upstream.
#
# In one run, side by side and interleaved round by round (the order rotates every round):
#   direct     wrk against fake-llm (release build) itself
#   llmvisor   wrk against `llmvisor serve`, proxying to its model `m`, another fake-llm of the
#              same binary, loaded before measuring
#   daemon-only  (GET only) wrk against the daemon's own `GET /healthz`: the daemon's HTTP
#              server with no upstream hop, to separate serving cost from proxying cost
# for two requests:
#   GET /small                              (direct: /small; llmvisor: /upstream/m/small)
#   POST /v1/chat/completions, not streamed (same path both ways; llmvisor parses the body's model)
# at each connection count in $CONNS. Also the daemon's VmRSS: idle with one model configured and
# not loaded, with the model loaded, and after the load test.
#
# Usage: bench/proxy.sh                  (prints Markdown tables; raw data stays in the run dir)
# Environment:
#   ROUNDS=7        rounds (every variant once per round)
#   DURATION=5      seconds per wrk run
#   CONNS="1 16"    connection counts (wrk uses -t1 for 1 connection, else -t2)
#   SKIP_BUILD=1    use the existing target/release binaries without running cargo
#   LLMVISOR_BIN_DIR=DIR  take llmvisor and fake-llm from DIR (LLMVISOR_VERSION=text names it)
#   LLMVISOR_B_BIN_DIR=DIR  A/B: also run a second daemon from DIR/llmvisor (variant
#                   "llmvisor-B", its model being the same fake-llm) in the same rounds;
#                   LLMVISOR_B_LABEL=text says what B is
#   BENCH_WORK=DIR  run directory (default: a new /tmp/llmvisor-bench-proxy.XXXXXX)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-5}
CONNS=${CONNS:-"1 16"}
WORK=${BENCH_WORK:-$(mktemp -d /tmp/llmvisor-bench-proxy.XXXXXX)}
mkdir -p "$WORK/raw"
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_python
ensure_wrk
build_llmvisor
RESULTS=$WORK/results.jsonl
EXTRA=$WORK/extra.jsonl
: >"$RESULTS"
: >"$EXTRA"
MACHINE=$(machine_info)
log "run directory: $WORK"
log "machine: $MACHINE"

read -r P_DIRECT P_DAEMON P_DAEMON_B <<<"$("${BENCH_PY[@]}" ports 3)"
read -r P_LO P_HI <<<"$("${BENCH_PY[@]}" port-range 20)"

write_config() { # FILE LISTEN_PORT STATE_DIR PORT_LO PORT_HI
    cat >"$1" <<EOF
listen = "127.0.0.1:$2"
state_dir = "$3"
port_range = [$4, $5]

[defaults]
ttl = "0"

[models.m]
cmd = ["$FAKE_LLM", "--port", "\${PORT}"]
EOF
}
write_config "$WORK/llmvisor.toml" "$P_DAEMON" "$WORK/state" "$P_LO" $((P_LO + 9))
"$LLMVISOR" check --config "$WORK/llmvisor.toml" >&2 || die "config rejected"
VARIANTS_B=()
if [[ -n ${LLMVISOR_B_BIN_DIR:-} ]]; then
    cp "$LLMVISOR_B_BIN_DIR/llmvisor" "$WORK/bin/llmvisor-b" || die "no $LLMVISOR_B_BIN_DIR/llmvisor"
    write_config "$WORK/llmvisor-b.toml" "$P_DAEMON_B" "$WORK/state-b" $((P_LO + 10)) "$P_HI"
    VARIANTS_B=(llmvisor-B)
fi

start_bg "$WORK/fake-direct.log" "$FAKE_LLM" --port "$P_DIRECT"
FAKE_DIRECT_PID=$BG_PID
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DIRECT/health" 30 || die "fake-llm did not start"

start_bg "$WORK/daemon.log" "$LLMVISOR" serve --config "$WORK/llmvisor.toml"
DAEMON_PID=$BG_PID
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DAEMON/healthz" 30 || die "llmvisor did not start"
sleep 1
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "idle after start, 1 model configured, not loaded" >/dev/null

"${BENCH_PY[@]}" http POST "http://127.0.0.1:$P_DAEMON/api/models/m/load" >/dev/null \
    || die "could not load model m"
CHILD_PID=$("${BENCH_PY[@]}" http GET "http://127.0.0.1:$P_DAEMON/api/models/m" --field pid)
[[ $CHILD_PID =~ ^[0-9]+$ ]] || die "no pid for model m"
sleep 0.5
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "model m loaded, before the load test" >/dev/null
log "fake-llm direct pid $FAKE_DIRECT_PID :$P_DIRECT; llmvisor pid $DAEMON_PID :$P_DAEMON; its child pid $CHILD_PID"
if [[ -n ${VARIANTS_B[*]} ]]; then
    start_bg "$WORK/daemon-b.log" "$WORK/bin/llmvisor-b" serve --config "$WORK/llmvisor-b.toml"
    DAEMON_B_PID=$BG_PID
    "${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DAEMON_B/healthz" 30 || die "llmvisor B did not start"
    "${BENCH_PY[@]}" http POST "http://127.0.0.1:$P_DAEMON_B/api/models/m/load" >/dev/null \
        || die "B could not load model m"
    CHILD_B_PID=$("${BENCH_PY[@]}" http GET "http://127.0.0.1:$P_DAEMON_B/api/models/m" --field pid)
    log "B: llmvisor-b pid $DAEMON_B_PID :$P_DAEMON_B; its child pid $CHILD_B_PID (${LLMVISOR_B_LABEL:-})"
fi

# url_of GROUP VARIANT ; cpu_of VARIANT
url_of() {
    case "$1/$2" in
    get/direct) echo "http://127.0.0.1:$P_DIRECT/small" ;;
    get/llmvisor) echo "http://127.0.0.1:$P_DAEMON/upstream/m/small" ;;
    get/daemon-only) echo "http://127.0.0.1:$P_DAEMON/healthz" ;;
    get/llmvisor-B) echo "http://127.0.0.1:$P_DAEMON_B/upstream/m/small" ;;
    post/llmvisor-B) echo "http://127.0.0.1:$P_DAEMON_B/v1/chat/completions" ;;
    post/direct) echo "http://127.0.0.1:$P_DIRECT/v1/chat/completions" ;;
    post/llmvisor) echo "http://127.0.0.1:$P_DAEMON/v1/chat/completions" ;;
    esac
}
cpu_args() {
    case "$1" in
    direct) echo "--cpu upstream=$FAKE_DIRECT_PID" ;;
    llmvisor) echo "--cpu daemon=$DAEMON_PID --cpu upstream=$CHILD_PID" ;;
    daemon-only) echo "--cpu daemon=$DAEMON_PID" ;;
    llmvisor-B) echo "--cpu daemon=$DAEMON_B_PID --cpu upstream=$CHILD_B_PID" ;;
    esac
}
group_name() { [[ $1 == get ]] && echo "GET /small" || echo "POST chat (non-streamed)"; }

# run_wrk ROUND GROUP CONNS VARIANT [SECONDS]
run_wrk() {
    local round=$1 group=$2 c=$3 v=$4 d=${5:-$DURATION} t=2 script=()
    ((c < 2)) && t=1
    [[ $group == post ]] && script=(-s "$BENCH_DIR/post.lua")
    # shellcheck disable=SC2046
    "${BENCH_PY[@]}" wrk --out "$RESULTS" --raw "$WORK/raw/r$round-$group-c$c-$v.txt" \
        --meta kind=wrk --meta "round=$round" --meta "group=$(group_name "$group")" \
        --meta "conns=$c" --meta "variant=$v" $(cpu_args "$v") \
        -- wrk -t"$t" -c"$c" -d"${d}s" --latency "${script[@]}" "$(url_of "$group" "$v")"
}

# rotated K ITEMS... : ITEMS rotated left by K
rotated() {
    local k=$1
    shift
    local a=("$@") n=$#
    for ((i = 0; i < n; i++)); do echo "${a[(i + k) % n]}"; done
}

log "warm-up (1 s per variant, not recorded)"
for g in get post; do
    for v in direct llmvisor "${VARIANTS_B[@]}"; do
        RESULTS=/dev/null run_wrk warm "$g" 16 "$v" 1 >/dev/null
    done
done
rm -f "$WORK"/raw/rwarm-*

log "measuring: $ROUNDS rounds × conns {$CONNS} × {GET direct/llmvisor/daemon-only, POST direct/llmvisor}, ${DURATION}s each"
for ((r = 0; r < ROUNDS; r++)); do
    log "round $((r + 1))/$ROUNDS (load average $(cut -d' ' -f1 /proc/loadavg))"
    for c in $CONNS; do
        for v in $(rotated "$r" direct llmvisor daemon-only "${VARIANTS_B[@]}"); do run_wrk "$r" get "$c" "$v"; done
        for v in $(rotated "$r" direct llmvisor "${VARIANTS_B[@]}"); do run_wrk "$r" post "$c" "$v"; done
    done
done

sleep 1
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "after the load test (model m loaded)" >/dev/null
"${BENCH_PY[@]}" rss "$CHILD_PID" --record "$EXTRA" --process "fake-llm (llmvisor's child), for scale" \
    --when "after the load test" >/dev/null
"${BENCH_PY[@]}" rss "$FAKE_DIRECT_PID" --record "$EXTRA" --process "fake-llm (direct), for scale" \
    --when "after the load test" >/dev/null
"${BENCH_PY[@]}" overhead "http://127.0.0.1:$P_DAEMON/metrics" --record "$EXTRA" >/dev/null || true
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "Machine: $MACHINE; load average at the end: $LOAD_END."
    echo
    echo "Settings: ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=\"$CONNS\"; wrk -t1 for 1 connection, -t2 otherwise."
    if [[ -n ${VARIANTS_B[*]} ]]; then echo; echo "llmvisor-B: ${LLMVISOR_B_LABEL:-$LLMVISOR_B_BIN_DIR/llmvisor}."; fi
    echo
    "${BENCH_PY[@]}" report-proxy "$RESULTS" --extra "$EXTRA"
} | tee "$WORK/report.md"

cleanup
rm -rf "${WORK:?}/bin"
log "raw data and report: $WORK"
