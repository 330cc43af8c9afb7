#!/usr/bin/env bash
# bench/proxy.sh — what llmvisor's proxy hop costs against a fast upstream (issues 3 and 14).
#
# One upstream server answers every variant: llmvisor's model `m`, started by the daemon on a
# fixed port and loaded before measuring. By default it is nginx (1 process, `return 200` with a
# small JSON body); UPSTREAM=fake-llm uses the release fake-llm instead. In one run, side by
# side and interleaved round by round (the order rotates every round):
#   direct       wrk against the upstream itself
#   llmvisor     wrk against `llmvisor serve`, proxying to the upstream
#   nginx        wrk against nginx as a reverse proxy in front of the same upstream
#                (`proxy_pass` with upstream keep-alive, 1 worker process, access log off)
#   daemon-only  (GET only) wrk against the daemon's own `GET /healthz`: the daemon's HTTP
#                server with no upstream hop, to separate serving cost from proxying cost
#   hyper-floor  wrk against examples/hop_floor.rs: the smallest proxy built from llmvisor's
#                parts (tokio on one thread, hyper server, hyper-util pooled client) and none
#                of its own work, so llmvisor − hyper-floor is what llmvisor itself costs
# for two requests:
#   GET /small                              (llmvisor: /upstream/m/small)
#   POST /v1/chat/completions, not streamed (same path everywhere; llmvisor parses the body's model)
# at each connection count in $CONNS. Also the daemon's VmRSS: idle with one model configured and
# not loaded, with the model loaded, and after the load test.
#
# Usage: bench/proxy.sh                  (prints Markdown tables; raw data stays in the run dir)
# Environment:
#   ROUNDS=5        rounds (every variant once per round)
#   DURATION=5      seconds per wrk run
#   CONNS="1 16"    connection counts (wrk uses -t1 for 1 connection, else -t2)
#   UPSTREAM=nginx  or fake-llm
#   SKIP_BUILD=1    use the existing target/release binaries without running cargo
#   LLMVISOR_BIN_DIR=DIR  take llmvisor and fake-llm from DIR (LLMVISOR_VERSION=text names it)
#   LLMVISOR_B_BIN_DIR=DIR  A/B: also run a second daemon from DIR/llmvisor (variant
#                   "llmvisor-B", its model another upstream of the same kind) in the same
#                   rounds; LLMVISOR_B_LABEL=text says what B is; LLMVISOR_B_ENV="K=V ..." is
#                   B's extra environment (e.g. the same build with LLMVISOR_WORKER_THREADS=2)
#   BENCH_WORK=DIR  run directory (default: a new /tmp/llmvisor-bench-proxy.XXXXXX)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-"1 16"}
UPSTREAM=${UPSTREAM:-nginx}
WORK=${BENCH_WORK:-$(mktemp -d /tmp/llmvisor-bench-proxy.XXXXXX)}
mkdir -p "$WORK/raw"
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_command python3
ensure_command wrk
ensure_command nginx
build_llmvisor
RESULTS=$WORK/results.jsonl
EXTRA=$WORK/extra.jsonl
: >"$RESULTS"
: >"$EXTRA"
MACHINE="$(machine_info), $(nginx -v 2>&1 | sed 's/^nginx version: //'), upstream: $UPSTREAM"
log "run directory: $WORK"
log "machine: $MACHINE"

read -r P_UP P_UP_B P_DAEMON P_DAEMON_B P_NGINX P_FLOOR <<<"$("${BENCH_PY[@]}" ports 6)"

# upstream_cmd PORT NAME: the TOML array that starts one upstream on PORT.
upstream_cmd() {
    case $UPSTREAM in
    fake-llm) echo "[\"$FAKE_LLM\", \"--port\", \"$1\"]" ;;
    nginx)
        mkdir -p "$WORK/$2"
        nginx_conf "$WORK/$2" "$(cat <<EOF
    server {
        listen 127.0.0.1:$1 backlog=4096;
        default_type application/json;
        location = /health { return 200 '{"status":"ok"}'; }
        location = /small { return 200 '{"ok":true}\n'; }
        location = /v1/chat/completions {
            return 200 '{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}';
        }
    }
EOF
)"
        echo "[\"$(command -v nginx)\", \"-p\", \"$WORK/$2\", \"-c\", \"nginx.conf\", \"-e\", \"stderr\"]"
        ;;
    *) die "UPSTREAM must be nginx or fake-llm, not $UPSTREAM" ;;
    esac
}

write_config() { # FILE LISTEN_PORT STATE_DIR UPSTREAM_PORT NAME
    cat >"$1" <<EOF
listen = "127.0.0.1:$2"
state_dir = "$3"

[defaults]
ttl = "0"

[models.m]
cmd = $(upstream_cmd "$4" "$5")
port = $4
EOF
}
write_config "$WORK/llmvisor.toml" "$P_DAEMON" "$WORK/state" "$P_UP" up
"$LLMVISOR" check --config "$WORK/llmvisor.toml" >&2 || die "config rejected"
VARIANTS_B=()
if [[ -n ${LLMVISOR_B_BIN_DIR:-} ]]; then
    cp "$LLMVISOR_B_BIN_DIR/llmvisor" "$WORK/bin/llmvisor-b" || die "no $LLMVISOR_B_BIN_DIR/llmvisor"
    write_config "$WORK/llmvisor-b.toml" "$P_DAEMON_B" "$WORK/state-b" "$P_UP_B" up-b
    VARIANTS_B=(llmvisor-B)
fi

# nginx as a reverse proxy in front of the upstream: one worker, keep-alive to the upstream.
mkdir -p "$WORK/nginx-proxy"
nginx_conf "$WORK/nginx-proxy" "$(cat <<EOF
    upstream up {
        server 127.0.0.1:$P_UP;
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$P_NGINX backlog=4096;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
EOF
)"

start_bg "$WORK/daemon.log" "$LLMVISOR" serve --config "$WORK/llmvisor.toml"
DAEMON_PID=$BG_PID
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DAEMON/healthz" 30 || die "llmvisor did not start"
sleep 1
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "idle after start, 1 model configured, not loaded" >/dev/null

# load_model DAEMON_PORT: loads `m` and prints its server's pid.
load_model() {
    "${BENCH_PY[@]}" http POST "http://127.0.0.1:$1/api/models/m/load" >/dev/null \
        || die "could not load model m on :$1"
    local pid
    pid=$("${BENCH_PY[@]}" http GET "http://127.0.0.1:$1/api/models/m" --field pid)
    [[ $pid =~ ^[0-9]+$ ]] || die "no pid for model m on :$1"
    echo "$pid"
}
UP_PID=$(load_model "$P_DAEMON")
sleep 0.5
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "model m loaded, before the load test" >/dev/null

start_bg "$WORK/nginx-proxy.log" nginx -p "$WORK/nginx-proxy" -c nginx.conf -e stderr
NGINX_PID=$BG_PID
"${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_NGINX/small" 30 || die "nginx proxy did not start"
log "upstream ($UPSTREAM) pid $UP_PID :$P_UP; llmvisor pid $DAEMON_PID :$P_DAEMON; nginx proxy pid $NGINX_PID :$P_NGINX"
VARIANTS_FLOOR=()
if [[ -n $HOP_FLOOR ]]; then
    start_bg "$WORK/hop-floor.log" "$HOP_FLOOR" "127.0.0.1:$P_FLOOR" "127.0.0.1:$P_UP"
    FLOOR_PID=$BG_PID
    "${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_FLOOR/small" 30 || die "hop_floor did not start"
    VARIANTS_FLOOR=(hyper-floor)
    log "hyper-floor pid $FLOOR_PID :$P_FLOOR"
fi
if [[ -n ${VARIANTS_B[*]} ]]; then
    # shellcheck disable=SC2086
    start_bg "$WORK/daemon-b.log" env ${LLMVISOR_B_ENV:-} "$WORK/bin/llmvisor-b" serve --config "$WORK/llmvisor-b.toml"
    DAEMON_B_PID=$BG_PID
    "${BENCH_PY[@]}" wait-http "http://127.0.0.1:$P_DAEMON_B/healthz" 30 || die "llmvisor B did not start"
    UP_B_PID=$(load_model "$P_DAEMON_B")
    log "B: llmvisor-b pid $DAEMON_B_PID :$P_DAEMON_B; its upstream pid $UP_B_PID (${LLMVISOR_B_LABEL:-})"
fi

# url_of GROUP VARIANT ; cpu_args VARIANT
url_of() {
    local chat=/v1/chat/completions
    case "$1/$2" in
    get/direct) echo "http://127.0.0.1:$P_UP/small" ;;
    get/llmvisor) echo "http://127.0.0.1:$P_DAEMON/upstream/m/small" ;;
    get/nginx) echo "http://127.0.0.1:$P_NGINX/small" ;;
    get/hyper-floor) echo "http://127.0.0.1:$P_FLOOR/small" ;;
    post/hyper-floor) echo "http://127.0.0.1:$P_FLOOR$chat" ;;
    get/daemon-only) echo "http://127.0.0.1:$P_DAEMON/healthz" ;;
    get/llmvisor-B) echo "http://127.0.0.1:$P_DAEMON_B/upstream/m/small" ;;
    post/direct) echo "http://127.0.0.1:$P_UP$chat" ;;
    post/llmvisor) echo "http://127.0.0.1:$P_DAEMON$chat" ;;
    post/nginx) echo "http://127.0.0.1:$P_NGINX$chat" ;;
    post/llmvisor-B) echo "http://127.0.0.1:$P_DAEMON_B$chat" ;;
    esac
}
cpu_args() {
    case "$1" in
    direct) echo "--cpu upstream=$UP_PID" ;;
    llmvisor) echo "--cpu proxy=$DAEMON_PID --cpu upstream=$UP_PID" ;;
    nginx) echo "--cpu proxy=$NGINX_PID --cpu upstream=$UP_PID" ;;
    hyper-floor) echo "--cpu proxy=$FLOOR_PID --cpu upstream=$UP_PID" ;;
    daemon-only) echo "--cpu proxy=$DAEMON_PID" ;;
    llmvisor-B) echo "--cpu proxy=$DAEMON_B_PID --cpu upstream=$UP_B_PID" ;;
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
    for v in direct llmvisor nginx "${VARIANTS_FLOOR[@]}" "${VARIANTS_B[@]}"; do
        RESULTS=/dev/null run_wrk warm "$g" 16 "$v" 1 >/dev/null
    done
done
rm -f "$WORK"/raw/rwarm-*

log "measuring: $ROUNDS rounds × conns {$CONNS} × {GET direct/llmvisor/nginx/daemon-only, POST direct/llmvisor/nginx}, ${DURATION}s each"
for ((r = 0; r < ROUNDS; r++)); do
    log "round $((r + 1))/$ROUNDS (load average $(cut -d' ' -f1 /proc/loadavg))"
    for c in $CONNS; do
        for v in $(rotated "$r" direct llmvisor nginx daemon-only "${VARIANTS_FLOOR[@]}" "${VARIANTS_B[@]}"); do run_wrk "$r" get "$c" "$v"; done
        for v in $(rotated "$r" direct llmvisor nginx "${VARIANTS_FLOOR[@]}" "${VARIANTS_B[@]}"); do run_wrk "$r" post "$c" "$v"; done
    done
done

sleep 1
"${BENCH_PY[@]}" rss "$DAEMON_PID" --record "$EXTRA" --process "llmvisor daemon" \
    --when "after the load test (model m loaded)" >/dev/null
"${BENCH_PY[@]}" rss "$NGINX_PID" --record "$EXTRA" --process "nginx proxy, for scale" \
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
