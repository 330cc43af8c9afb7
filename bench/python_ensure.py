"""Benchmarks of the Python package against the fake server.

    cargo build --release -p fake-llm
    pip install ./crates/llmvisor-py            # a release wheel
    python bench/python_ensure.py [--calls N] [--threads N]

1. `ensure_server_running` on a ready model, from Python: the median over 21 runs of the mean
   time per call of a loop of N calls (the GIL hop included: the call does not release it on
   this path, see crates/llmvisor-py/src/lib.rs), then the same with `lease()` + `release()`,
   and the p50/p99 of single calls while another model is loading.
2. N threads (default 1000) call `ensure_server_running` on a cold model at once: the wall time
   until all have their URL, the number of servers spawned (from the fake server's pid file),
   and how many distinct URLs they got.
Every server started is stopped at the end and checked gone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import llmvisor

WORKSPACE = Path(__file__).resolve().parent.parent


def fake_llm() -> Path:
    env = os.environ.get("FAKE_LLM_BIN")
    for c in ([Path(env)] if env else []) + [WORKSPACE / "target" / p / "fake-llm"
                                              for p in ("release", "debug")]:
        if c.exists():
            return c
    raise SystemExit("fake-llm not found: run `cargo build --release -p fake-llm`")


def config(scratch: Path) -> str:
    text = f'state_dir = "{scratch / "state"}"\nport_range = [41000, 41099]\n'
    for model, delay in (("warm", "0"), ("slow", "5s"), ("cold", "1s")):
        text += (f"[models.{model}]\n"
                 f'cmd = "{fake_llm()} --port ${{PORT}} --startup-delay {delay} '
                 f'--pid-file {scratch / (model + ".pids")}"\n')
    return text


def per_call(fn, n: int, runs: int = 21) -> float:
    means = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        means.append((time.perf_counter_ns() - t) / n)
    return statistics.median(means)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmvisor-bench") as tmp:
        scratch = Path(tmp)
        with llmvisor.Supervisor(config_text=config(scratch)) as sup:
            sup.ensure_server_running("warm")
            ns = per_call(lambda: sup.ensure_server_running("warm"), args.calls)
            print(f"ensure_server_running, ready model: {ns:.0f} ns/call (median of 21 x {args.calls})")

            def lease_release():
                sup.lease("warm").release()

            ns = per_call(lease_release, args.calls // 2)
            print(f"lease() + release(), ready model:   {ns:.0f} ns/call")

            loading = threading.Thread(target=sup.ensure_server_running, args=("slow",))
            loading.start()
            while next(s for s in sup.status() if s["id"] == "slow")["state"] != "starting":
                time.sleep(0.001)
            single = []
            for _ in range(2000):
                t = time.perf_counter_ns()
                sup.ensure_server_running("warm")
                single.append(time.perf_counter_ns() - t)
            single.sort()
            print(f"while another model loads: p50 {single[1000] / 1000:.1f} us, "
                  f"p99 {single[1980] / 1000:.1f} us, max {single[-1] / 1000:.1f} us (2000 calls)")
            loading.join()

            barrier = threading.Barrier(args.threads + 1)
            urls = []
            lock = threading.Lock()

            def cold():
                barrier.wait()
                url = sup.ensure_server_running("cold")
                with lock:
                    urls.append(url)

            threads = [threading.Thread(target=cold) for _ in range(args.threads)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            barrier.wait()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            spawned = (scratch / "cold.pids").read_text().split()
            ready_ms = next(s for s in sup.status() if s["id"] == "cold")["ready_ms"]
            print(f"{args.threads} threads, cold model (startup delay 1s): all had the URL after "
                  f"{wall:.2f}s; {len(spawned)} server(s) spawned, {len(set(urls))} distinct URL(s), "
                  f"the start took {ready_ms} ms")
            servers = [int(p) for f in scratch.glob("*.pids") for p in f.read_text().split()]
        left = [p for p in servers if Path(f"/proc/{p}").exists()]
        print("closed:", "every server stopped" if not left else f"STILL RUNNING {left}")


if __name__ == "__main__":
    main()
