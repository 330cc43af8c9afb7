"""A desktop chat app whose hand-written server manager is replaced by llmvisor.

    pip install ./crates/llmvisor-py      # once, from the checkout
    cargo build -p fake-llm               # the stand-in for llama-server used here
    python crates/llmvisor-py/examples/chat_app.py

Two "chats" run on their own threads, as in the original app, and each opens conversations on
models as its user picks them. Both ask for "gemma" at the same moment: one start, one server,
the same URL. "qwen" loads in parallel with it. A chat that asks for a model that is already up
gets it at once. At exit, `close()` stops every server (and the exit hook would, had we forgotten).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import llmvisor

HERE = Path(__file__).resolve().parent
WORKSPACE = HERE.parent.parent.parent

# Each chat: the models its user opens, in order, with a pause before each.
CHATS = {
    "chat 1": [("gemma", 0.0), ("qwen", 0.5)],
    "chat 2": [("qwen", 0.0), ("gemma", 0.2), ("gemma", 0.0)],
}


def find_fake_llm() -> Path:
    env = os.environ.get("FAKE_LLM_BIN")
    candidates = [Path(env)] if env else []
    candidates += [WORKSPACE / "target" / p / "fake-llm" for p in ("debug", "release")]
    for c in candidates:
        if c.exists():
            return c
    raise SystemExit("fake-llm not found: run `cargo build -p fake-llm` (or set FAKE_LLM_BIN)")


def config_text(fake_llm: Path, scratch: Path) -> str:
    text = f'state_dir = "{scratch / "state"}"\n'
    for model, delay in (("gemma", "1s"), ("qwen", "2s"), ("phi", "1s")):
        text += (
            f"[models.{model}]\n"
            f'cmd = "{fake_llm} --port ${{PORT}} --startup-delay {delay} '
            f'--pid-file {scratch / (model + ".pids")}"\n'
        )
    return text


def ask(url: str, model: str, text: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "max_tokens": 4}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["choices"][0]["message"]["content"].strip()


_asked = set()
_asked_lock = threading.Lock()


def chat(name: str, picks, sup: llmvisor.Supervisor, began: float, out_lock: threading.Lock):
    for model, pause in picks:
        time.sleep(pause)
        with _asked_lock:
            first = model not in _asked
            _asked.add(model)
        state = next(s["state"] for s in sup.status() if s["id"] == model)
        t = time.monotonic()
        lines = []
        url = sup.ensure_server_running(model, log_callback=lines.append)
        took = time.monotonic() - t
        how = ("started it" if first else
               "reused the running server" if state == "ready" else
               "joined the start under way")
        answer = ask(url, model, f"hello from {name}")
        with out_lock:
            print(f"[{time.monotonic() - began:5.2f}s] [{name}] {model}: {how} at {url} "
                  f"(waited {took * 1000:.0f} ms, {len(lines)} log lines) -> {answer!r}")


def main() -> None:
    fake_llm = find_fake_llm()
    with tempfile.TemporaryDirectory(prefix="chat-app") as tmp:
        scratch = Path(tmp)
        with llmvisor.Supervisor(config_text=config_text(fake_llm, scratch)) as sup:
            began = time.monotonic()
            out_lock = threading.Lock()
            threads = [threading.Thread(target=chat, args=(n, p, sup, began, out_lock))
                       for n, p in CHATS.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print()
            for s in sup.status():
                spawned = (scratch / f"{s['id']}.pids")
                pids = spawned.read_text().split() if spawned.exists() else []
                print(f"{s['id']}: {s['state']}, {len(pids)} server process(es) started, "
                      f"pid {s['pid']}, url {s['url']}, leases {s['leases']}")
            servers = [int(p) for f in scratch.glob("*.pids") for p in f.read_text().split()]
        # Leaving the `with` closed the supervisor: every server is stopped.
        left = [p for p in servers if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        print("\nclosed:", "every server stopped" if not left else f"STILL RUNNING {left}")
        if left:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
