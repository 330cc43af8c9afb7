# shellcheck shell=bash disable=SC2034
# Shared helpers for bench/proxy.sh and bench/llama.sh (sourced, not run).
#
# Every process a benchmark starts goes through `start_bg`, which runs it in its own session
# (so its process group id is its pid) and records the pid; `cleanup` (installed as the EXIT
# trap) sends SIGTERM to each recorded group, then SIGKILL to what is left, reaps them, and
# checks that nothing started under the run directory is still alive.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
BENCH_PY=(python3 "$BENCH_DIR/bench.py")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

STARTED_PIDS=()

# start_bg LOGFILE CMD... : starts CMD in a new session, output to LOGFILE; sets BG_PID.
start_bg() {
    local logfile=$1
    shift
    setsid "$@" >"$logfile" 2>&1 </dev/null &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# stop_pid PID [GRACE_S]: SIGTERM to the process group PID leads, SIGKILL after GRACE_S.
stop_pid() {
    local pid=$1 grace=${2:-15} i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        # a zombie counts as gone once reaped by the `wait` below
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then
        log "pid $pid ignored SIGTERM for ${grace}s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true  # its status (143 after SIGTERM) is no failure of ours
    return 0
}

# Pids (not zombies) whose command line mentions $1: used only to check for leftovers of this
# run (the run directory is unique), never to pick processes to kill by name.
pids_mentioning() {
    local needle=$1 d
    for d in /proc/[0-9]*; do
        [[ -r $d/cmdline ]] || continue
        [[ "$(awk '{print $3}' "$d/stat" 2>/dev/null)" == Z ]] && continue
        if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$needle"; then
            echo "${d#/proc/}"
        fi
    done
}

CLEANED=0
cleanup() {
    [[ $CLEANED == 1 ]] && return
    CLEANED=1
    local pid left
    # Stop in reverse start order (the daemons first, so that they stop their own children).
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED_PIDS[i]}"
    done
    if [[ -n ${WORK:-} ]]; then
        sleep 0.3
        left=$(pids_mentioning "$WORK" | grep -vx "$$" || true)
        if [[ -n $left ]]; then
            log "left over after cleanup (started by this run): $left — killing these pids"
            for pid in $left; do kill -KILL "$pid" 2>/dev/null; done
        else
            log "cleanup: no process of this run is left"
        fi
    fi
}

# ensure_command CMD [PACKAGE]: installs Debian's PACKAGE (default: CMD) when CMD is missing.
# (nginx's own service is not started by this: the benchmarks run their own nginx processes in
# the foreground, one per run directory.)
ensure_command() {
    local cmd=$1 package=${2:-$1} sudo=
    command -v "$cmd" >/dev/null && return 0
    command -v apt-get >/dev/null || die "$cmd is missing and there is no apt-get to install it"
    log "installing $package from Debian"
    [[ $(id -u) == 0 ]] || sudo=sudo
    $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq "$package" >&2 \
        || die "could not install $package"
}

# nginx_conf DIR SERVERS: writes DIR/nginx.conf, one foreground process (no master, no daemon),
# access log off, its temp files under DIR, and SERVERS (upstream/server blocks) in `http`.
nginx_conf() {
    cat >"$1/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid nginx.pid;
error_log stderr warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_body_temp_path body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
$2
}
EOF
}


# build_llmvisor: release build of llmvisor and fake-llm, copied into $WORK/bin so that a
# rebuild by someone else during the run cannot swap the binaries under the benchmark.
# LLMVISOR_BIN_DIR=DIR takes llmvisor and fake-llm from DIR instead (e.g. a build of a clean
# `git archive` snapshot, when others are editing the working tree during the run).
build_llmvisor() {
    if [[ -n ${LLMVISOR_BIN_DIR:-} ]]; then
        mkdir -p "$WORK/bin"
        cp "$LLMVISOR_BIN_DIR/llmvisor" "$LLMVISOR_BIN_DIR/fake-llm" "$WORK/bin/" \
            || die "no llmvisor/fake-llm in $LLMVISOR_BIN_DIR"
        LLMVISOR="$WORK/bin/llmvisor"
        FAKE_LLM="$WORK/bin/fake-llm"
        copy_hop_floor "$LLMVISOR_BIN_DIR/hop_floor"
        return
    fi
    if [[ ${SKIP_BUILD:-0} != 1 ]]; then
        command -v cargo >/dev/null || die "cargo is missing (install Rust: https://rustup.rs)"
        log "cargo build --release -p llmvisor -p fake-llm (and the hop_floor example)"
        (cd "$REPO" && cargo build --release -q -p llmvisor -p fake-llm \
            && cargo build --release -q -p llmvisor --example hop_floor) >&2 \
            || die "cargo build failed"
    fi
    mkdir -p "$WORK/bin"
    cp "$REPO/target/release/llmvisor" "$REPO/target/release/fake-llm" "$WORK/bin/" \
        || die "no release binaries in $REPO/target/release"
    LLMVISOR="$WORK/bin/llmvisor"
    FAKE_LLM="$WORK/bin/fake-llm"
    copy_hop_floor "$REPO/target/release/examples/hop_floor"
}

# copy_hop_floor FILE: the minimal hyper proxy (examples/hop_floor.rs) when FILE exists; sets
# HOP_FLOOR (empty when it does not: its variant is then left out).
copy_hop_floor() {
    HOP_FLOOR=
    if [[ -x $1 ]]; then
        cp "$1" "$WORK/bin/hop_floor" && HOP_FLOOR="$WORK/bin/hop_floor"
    fi
}

machine_info() {
    local cpu
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    echo "$(nproc) vCPUs ($cpu), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, Linux $(uname -r)," \
        "$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), llmvisor ${LLMVISOR_VERSION:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet 2>/dev/null || echo '+uncommitted')}, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}
