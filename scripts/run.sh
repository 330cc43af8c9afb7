#!/usr/bin/env bash
# One command from a fresh machine to served models: builds llmvisor, builds/fetches a real
# llama-server and two small real models (SmolLM2-135M-Instruct, the default, and Gemma 3 270M)
# into ~/.cache/llmvisor, writes a starter config (once; edit it freely afterwards) and runs
# `llmvisor serve` on 127.0.0.1:8080. Every model already on the machine (Ollama's store, the
# Hugging Face cache, llama.cpp's cache, LM Studio's folders) is served beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "run: building llmvisor (release)…" >&2
cargo build --release -p llmvisor >&2
setup_out=$(scripts/setup-llama.sh)
eval "$setup_out"

config_dir=${LLMVISOR_CONFIG_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/llmvisor}
config=$config_dir/llmvisor.toml
mkdir -p "$config_dir" "$HOME/models"
if [ ! -f "$config" ]; then
  cat >"$config" <<TOML
# llmvisor starter config (written by scripts/run.sh). Reload after editing: kill -HUP <pid>.
listen = "127.0.0.1:8080"

# Besides the models below, every GGUF in these folders and in the model stores on this machine
# (discover = ["ollama", "huggingface", "llama.cpp", "lmstudio"] by default) is served.
models_dirs = ["~/models"]

[defaults]
ttl = "10m"              # stop a server after 10 idle minutes
startup_timeout = "120s"

# The default: an instruction-tuned model that carries its chat template, so a question gets a
# short answer that stops by itself.
[models."smollm2-135m-instruct"]
cmd = ["$LLAMA_SERVER", "-m", "$LLAMA_MODEL_SMOL", "--host", "127.0.0.1", "--port", "\${PORT}", "-c", "2048", "-t", "2", "-n", "256"]
aliases = ["smollm2", "default"]

# Two "models" from one GGUF file with different context sizes: each is its own llama-server.
# This GGUF carries no chat template (llama-server would fall back to ChatML, which Gemma does
# not know): "--no-jinja --chat-template gemma" selects llama.cpp's built-in Gemma template.
# "-n 256" caps a reply whose request sets no max_tokens (a 270M model otherwise rambles on
# until the context is full: minutes on a small CPU).
[models."gemma-3-270m"]
cmd = ["$LLAMA_SERVER", "-m", "$LLAMA_MODEL", "--host", "127.0.0.1", "--port", "\${PORT}", "-c", "2048", "-t", "2", "--no-jinja", "--chat-template", "gemma", "-n", "256"]
aliases = ["gemma"]

[models."gemma-3-270m-8k"]
# Reached over a unix socket: no port at all, so no port can ever conflict.
cmd = ["$LLAMA_SERVER", "-m", "$LLAMA_MODEL", "--host", "\${SOCKET}", "-c", "8192", "-t", "2", "--no-jinja", "--chat-template", "gemma", "-n", "256"]
TOML
  echo "run: wrote $config" >&2
else
  echo "run: using existing $config" >&2
fi

cat >&2 <<EOT

llmvisor is starting on http://127.0.0.1:8080 — models load on first use.

  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "smollm2", "max_tokens": 64, "messages": [{"role": "user", "content": "Say hello in five words."}]}'

  curl -s http://127.0.0.1:8080/api/tags      # Ollama's clients work too (OLLAMA_HOST=127.0.0.1:8080)
  target/release/llmvisor models              # every model found, from where

  $LLAMA_VENV/bin/python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
for chunk in client.chat.completions.create(
        model="smollm2", stream=True, max_tokens=64,
        messages=[{"role": "user", "content": "Say hello in five words."}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

  target/release/llmvisor ps        # what runs, from another terminal
  Ctrl-C stops llmvisor and every server it started.

EOT
exec target/release/llmvisor serve --config "$config"
