#!/usr/bin/env bash
# Browser test of the dashboard (/ui/): Debian's chromium (installed with apt-get when missing),
# driven by Playwright from the venv under ~/.cache/llmvisor (created when missing). Never
# downloads a browser. Prints "ui tests: N passed, N failed"; exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0 PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

if [ ! -x /usr/bin/chromium ]; then
  echo "ui-test: installing chromium (apt-get)" >&2
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
venv="${LLAMA_VENV:-$HOME/.cache/llmvisor/venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import playwright' 2>/dev/null; then
  "$venv/bin/pip" install -q playwright
fi
cargo build -q --workspace
target="${CARGO_TARGET_DIR:-target}"
exec "$venv/bin/python" scripts/ui_test.py "$target/debug/llmvisor" "$target/debug/fake-llm"
