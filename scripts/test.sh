#!/usr/bin/env bash
# Runs every test of llmvisor: unit tests, the supervisor and daemon tests against the fake
# server, and the end-to-end tests on a real llama-server with a real model.
#
# The real llama-server and model are built/fetched once into ~/.cache/llmvisor by
# scripts/setup-llama.sh (about 6-10 minutes the first time on 2 cores, seconds afterwards).
# LLMVISOR_SKIP_LLAMA=1 skips that step; the end-to-end tests then skip themselves (never in CI).
#
# Then the Python package: a venv outside the source tree (LLMVISOR_PY_VENV, default
# ~/.cache/llmvisor/py-venv) gets maturin, pytest, openai and mypy from PyPI, the wheel is built from
# crates/llmvisor-py (debug profile, sharing the build above; LLMVISOR_PY_PROFILE=release for an
# optimised one) and installed, and its pytest suite runs. LLMVISOR_SKIP_PYTHON=1 skips it.
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
  # Prints LLAMA_SERVER=…, LLAMA_MODEL=…, LLAMA_MODEL_SMOL=…, LLAMA_VENV=… on stdout.
  setup_out=$(scripts/setup-llama.sh)
  eval "$setup_out"
  export LLAMA_SERVER LLAMA_MODEL LLAMA_MODEL_SMOL LLAMA_VENV
fi

log=$(mktemp)
pylog=$(mktemp)
wheels=$(mktemp -d)
trap 'rm -rf "$log" "$pylog" "$wheels"' EXIT
status=0
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --no-fail-fast "${features[@]}" "$@" 2>&1 | tee "$log" || status=$?

if [ "${LLMVISOR_SKIP_PYTHON:-0}" != 1 ]; then
  venv=${LLMVISOR_PY_VENV:-$HOME/.cache/llmvisor/py-venv}
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! { [ -x "$venv/bin/maturin" ] && "$venv/bin/python" -c "import pytest, openai, mypy" 2>/dev/null; }; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet maturin pytest openai mypy
  fi
  profile=()
  [ "${LLMVISOR_PY_PROFILE:-debug}" = release ] && profile=(--release)
  py_status=0
  {
    "$venv/bin/maturin" build "${profile[@]}" --manifest-path crates/llmvisor-py/Cargo.toml \
        --interpreter "$venv/bin/python" --out "$wheels" &&
      "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheels"/llmvisor-*.whl &&
      FAKE_LLM_BIN="$PWD/target/debug/fake-llm" "$venv/bin/python" -m pytest -p no:cacheprovider \
        crates/llmvisor-py/tests -q -rs
  } 2>&1 | tee "$pylog" || py_status=$?
  if [ "$py_status" != 0 ]; then
    status=$py_status
  fi
fi

# The dashboard in a real browser (headless chromium); LLMVISOR_SKIP_UI=1 skips it (never in CI).
if [ "${LLMVISOR_SKIP_UI:-0}" != 1 ]; then
  scripts/ui-test.sh 2>&1 | tee -a "$log" || status=1
fi

# One closing line for the whole run, summed over every test binary, the browser test and
# pytest's run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     /^ui tests:/ { p += $3; f += $5 }
     END { printf "%d %d\n", p, f }' "$log" >"$log.sum"
read -r passed failed <"$log.sum"
rm -f "$log.sum"
# pytest -q ends with e.g. "12 passed, 1 failed, 2 skipped in 9.87s" (errors count as failed).
read -r py_passed py_failed < <(awk '/ in [0-9.]+s/ && /(passed|failed|error)/ { p = 0; f = 0
       for (i = 2; i <= NF; i++) { if ($(i) ~ /^passed,?$/) p = $(i-1); if ($(i) ~ /^(failed|errors?),?$/) f += $(i-1) } }
     END { printf "%d %d\n", p, f }' "$pylog")
echo "tests: $((passed + py_passed)) passed, $((failed + py_failed)) failed"
exit "$status"
