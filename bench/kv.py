#!/usr/bin/env python3
"""bench/kv.py — issue 22's benchmark: time to the first new token after a swap, with and
without kv_persist, for chat histories of about 500, 2,000 and 4,000 tokens; llama-server's
save and restore times and the slot file sizes.

One `llmvisor serve` (built from this tree, or $LLMVISOR_BIN) with two models on the same
llama-server command (SmolLM2-135M, -c 8192 -np 1): `kv` (kv_persist = true) and `plain`.
For each history size and model: build the history (one request), unload the model (the
swap: `kv` saves its slot here), then time a streamed follow-up turn from the request to its
first content chunk (the start, the restore, the prompt evaluation and one token). Save and
restore figures come from the daemon's /metrics counters (llama-server's own timings).

Usage: LLAMA_SERVER=... LLAMA_MODEL_SMOL=... bench/kv.py   (prints a Markdown table)
Environment: ROUNDS=3 (follow-up turns timed per size and model; the median is shown),
THREADS=2 (llama-server -t).
"""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [500, 2000, 4000]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
THREADS = os.environ.get("THREADS", "2")


def die(msg):
    sys.exit(f"bench/kv.py: {msg}")


def post(url, body, stream=False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def history(tokens):
    # About 18 tokens per note with SmolLM2's tokenizer.
    n = max(1, tokens // 18)
    return " ".join(f"Note {i}: the lighthouse keeper counted {i} ships near the rocks."
                    for i in range(1, n + 1))


def metrics(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^(llmvisor_model_kv_\w+)\{model="kv"\} (\d+)$', text, re.M):
        out[m.group(1)] = int(m.group(2))
    return out


def first_token_s(base, model, messages):
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0,
            "stream": True}
    began = time.monotonic()
    with post(base + "/v1/chat/completions", body) as r:
        for line in r:
            if line.startswith(b"data:") and b'"content"' in line:
                return time.monotonic() - began
    die(f"{model}: no content chunk")


def main():
    server = os.environ.get("LLAMA_SERVER") or die("LLAMA_SERVER not set")
    model = os.environ.get("LLAMA_MODEL_SMOL") or die("LLAMA_MODEL_SMOL not set")
    binary = os.environ.get("LLMVISOR_BIN")
    if not binary:
        subprocess.run(["cargo", "build", "-p", "llmvisor"], cwd=REPO, check=True)
        binary = os.path.join(REPO, "target", "debug", "llmvisor")
    run = tempfile.mkdtemp(prefix="llmvisor-kv-bench-")
    cmd = json.dumps([server, "-m", model, "--host", "127.0.0.1", "--port", "${PORT}",
                      "-c", "8192", "-np", "1", "-t", THREADS])
    config = os.path.join(run, "llmvisor.toml")
    with open(config, "w") as f:
        f.write(f'listen = "127.0.0.1:0"\nstate_dir = "{run}/state"\nmax_loaded = 1\n'
                f'[defaults]\nttl = "0"\nstartup_timeout = "120s"\n'
                f'[models.kv]\ncmd = {cmd}\nkv_persist = true\nkv_save_timeout = "60s"\n'
                f'[models.plain]\ncmd = {cmd}\n')
    log = open(os.path.join(run, "daemon.log"), "w+")
    daemon = subprocess.Popen([binary, "serve", "--config", config], stderr=log,
                              stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        base = None
        for _ in range(200):
            log.seek(0)
            m = re.search(r"listening on (http://\S+)", log.read())
            if m:
                base = m.group(1)
                break
            time.sleep(0.05)
        base or die("the daemon never said where it listens")
        rows = []
        for size in SIZES:
            first = [{"role": "user", "content": history(size)}]
            row = {"size": size}
            for name in ["plain", "kv"]:
                with post(base + "/v1/chat/completions",
                          {"model": name, "messages": first, "max_tokens": 8,
                           "temperature": 0}) as r:
                    answer = json.load(r)
                row["tokens"] = answer["usage"]["prompt_tokens"]
                turn = first + [answer["choices"][0]["message"],
                                {"role": "user", "content": "Which ship came last?"}]
                times = []
                for _ in range(ROUNDS):
                    before = metrics(base)
                    post(base + f"/api/models/{name}/unload", {}).read()
                    times.append(first_token_s(base, name, turn))
                    after = metrics(base)
                    if name == "kv":
                        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                        row.setdefault("save_ms", []).append(
                            d["llmvisor_model_kv_save_milliseconds_total"])
                        row.setdefault("restore_ms", []).append(
                            d["llmvisor_model_kv_restore_milliseconds_total"])
                        row["bytes"] = d["llmvisor_model_kv_saved_bytes_total"]
                row[name] = statistics.median(times)
                post(base + f"/api/models/{name}/unload", {}).read()
            rows.append(row)
        print("| history (prompt tokens) | first token after a swap, without | with kv_persist "
              "| save (llama-server) | restore | slot file |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['tokens']} | {r['plain']:.2f} s | {r['kv']:.2f} s "
                  f"| {statistics.median(r['save_ms'])} ms | {statistics.median(r['restore_ms'])} ms "
                  f"| {r['bytes'] / 2**20:.0f} MiB |")
        print(f"\n(median of {ROUNDS} turns each; raw daemon log: {log.name})")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
