#!/usr/bin/env bash
# Runs every test of llmvisor: unit tests, the supervisor and daemon tests against the fake
# server, and the end-to-end tests on a real llama-server with a real model.
#
# The real llama-server and model are built/fetched once into ~/.cache/llmvisor by
# scripts/setup-llama.sh (about 6-10 minutes the first time on 2 cores, seconds afterwards).
# LLMVISOR_SKIP_LLAMA=1 skips that step; the end-to-end tests then skip themselves (never in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${LLMVISOR_SKIP_LLAMA:-0}" != 1 ]; then
  # Prints LLAMA_SERVER=…, LLAMA_MODEL=…, LLAMA_VENV=… on stdout.
  setup_out=$(scripts/setup-llama.sh)
  eval "$setup_out"
  export LLAMA_SERVER LLAMA_MODEL LLAMA_VENV
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# The dashboard in a real browser (headless chromium); LLMVISOR_SKIP_UI=1 skips it (never in CI).
if [ "${LLMVISOR_SKIP_UI:-0}" != 1 ]; then
  scripts/ui-test.sh 2>&1 | tee -a "$log" || status=1
fi
# One closing line for the whole run, summed over every test binary and the browser test.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     /^ui tests:/ { p += $3; f += $5 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
