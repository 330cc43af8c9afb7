#!/usr/bin/env bash
# Runs every test of llmvisor: unit tests, the supervisor and daemon tests against the fake
# server, and the end-to-end tests on a real llama-server with a real model.
#
# The real llama-server and model are built/fetched once into ~/.cache/llmvisor by
# scripts/setup-llama.sh (about 6-10 minutes the first time on 2 cores, seconds afterwards).
# LLMVISOR_SKIP_LLAMA=1 skips that step; the end-to-end tests then skip themselves (never in CI).
#
# Fleet mode (cargo feature `fleet`, tests/fleet.rs) needs etcd and protoc: scripts/setup-fleet.sh
# installs them with apt-get when missing (quiet when present). LLMVISOR_SKIP_FLEET=1 builds and
# tests without the feature.
set -euo pipefail
cd "$(dirname "$0")/.."

features=()
if [ "${LLMVISOR_SKIP_FLEET:-0}" != 1 ]; then
  scripts/setup-fleet.sh
  features=(--features llmvisor/fleet)
fi

if [ "${LLMVISOR_SKIP_LLAMA:-0}" != 1 ]; then
  # Prints LLAMA_SERVER=…, LLAMA_MODEL=…, LLAMA_VENV=… on stdout.
  setup_out=$(scripts/setup-llama.sh)
  eval "$setup_out"
  export LLAMA_SERVER LLAMA_MODEL LLAMA_VENV
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "${features[@]}" "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
