#!/usr/bin/env bash
# The whole suite (scripts/test.sh, arguments passed on) while a CPU hog keeps every core busy:
# a test that depends on the machine being fast fails here first. One busy loop per core
# (LOAD_PROCS to change), each stopped by its pid when the run ends, however it ends.
#   scripts/test-under-load.sh            # then read the summary line "tests: N passed, M failed"
set -euo pipefail
cd "$(dirname "$0")/.."
procs=${LOAD_PROCS:-$(nproc)}
hogs=()
stop_hogs() {
    ((${#hogs[@]})) || return 0
    kill "${hogs[@]}" 2>/dev/null || true
    wait "${hogs[@]}" 2>/dev/null || true
}
trap stop_hogs EXIT
for _ in $(seq "$procs"); do
    (while :; do :; done) &
    hogs+=($!)
done
echo "test-under-load: $procs busy loops (pids ${hogs[*]})" >&2
scripts/test.sh "$@"
