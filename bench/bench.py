#!/usr/bin/env python3
"""Measurement helpers for bench/proxy.sh and bench/llama.sh (Python 3 standard library only).

Subcommands (each prints to stdout; results are appended as JSON lines to --out):

  ports N                     N free TCP ports on 127.0.0.1
  port-range N                "LO HI": N consecutive free ports (for llmvisor's port_range)
  wait-http URL [SECONDS]     poll URL until it answers 200 (exit 1 on timeout)
  rss PID [--record F ...]    VmRSS of PID in kB (optionally appended to F as a JSON line)
  http METHOD URL [--field K] one request; prints the status and JSON answer (or one field)
  children PID                the pids whose parent is PID
  overhead METRICS_URL        summarises llmvisor's proxy-overhead histogram
  wrk --out F --meta k=v ... [--cpu NAME=PID ...] -- WRK ARGS...
                              runs wrk once, records requests/s, p50/p90/p99, errors, the CPU time
                              the named processes used during the run, and the load average
  cold ...                    llama cold start (first byte) via direct / llmvisor / router
  hot ...                     llama hot latency (keep-alive, interleaved request by request)
  report-proxy F [--extra F]  Markdown tables for bench/proxy.sh
  report-llama F [--extra F]  Markdown tables for bench/llama.sh

Statistics: a "round" runs every variant once, side by side, in an order that rotates from round to
round. Reported values are medians over rounds; ratios and differences are computed per round
(paired: the same round's variants ran seconds apart) and then their median is taken.
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- process info ---

def rss_kb(pid):
    """VmRSS of a process in kB (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def hwm_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_ticks(pid):
    """utime + stime of a process (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def children_of(pid):
    """Pids whose parent is pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        if rest[0] == "Z":
            continue
        if int(rest[1]) == pid:
            out.append(int(d))
    return out


def alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rindex(")") + 2:].split()[0] != "Z"


# ------------------------------------------------------------------------------------ ports ---

def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def port_free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_range(n):
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 30000)
        if all(port_free(p) for p in range(lo, lo + n)):
            return lo, lo + n - 1
    raise SystemExit("no free port range found")


# ------------------------------------------------------------------------------- tiny HTTP ---

class Response:
    __slots__ = ("status", "headers", "body", "t_first", "t_end", "close")


def _read_response(sock, t0):
    """Reads one HTTP/1.1 response from sock. Times are seconds since t0 (perf_counter)."""
    buf = b""
    first = None
    while b"\r\n\r\n" not in buf:
        d = sock.recv(65536)
        if first is None:
            first = time.perf_counter()
        if not d:
            raise ConnectionError("connection closed before a response")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    r = Response()
    r.status = int(lines[0].split()[1])
    r.headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        r.headers[k.strip().lower()] = v.strip()
    body = rest
    if "content-length" in r.headers:
        n = int(r.headers["content-length"])
        while len(body) < n:
            d = sock.recv(65536)
            if not d:
                raise ConnectionError("connection closed inside the body")
            body += d
    elif r.headers.get("transfer-encoding", "").lower() == "chunked":
        # Good enough for JSON answers: read until the terminating zero-size chunk.
        while not body.endswith(b"0\r\n\r\n"):
            d = sock.recv(65536)
            if not d:
                break
            body += d
    else:
        while True:
            d = sock.recv(65536)
            if not d:
                break
            body += d
    r.body = body
    r.t_first = first - t0
    r.t_end = time.perf_counter() - t0
    r.close = r.headers.get("connection", "").lower() == "close"
    return r


def _request_bytes(host, port, method, path, body, keep_alive):
    h = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
         "Connection: keep-alive" if keep_alive else "Connection: close"]
    if body is not None:
        h.append("Content-Type: application/json")
        h.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(h) + "\r\n\r\n").encode() + (body or b"")


def once(host, port, method, path, body=None, timeout=300.0, t0=None):
    """One request on a fresh connection; returns a Response with times since t0 (default: now)."""
    if t0 is None:
        t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_request_bytes(host, port, method, path, body, False))
        return _read_response(s, t0)
    finally:
        s.close()


class KeepAlive:
    """A persistent connection; reconnects (outside the timed part) when the server closes."""

    def __init__(self, host, port):
        self.host, self.port, self.sock, self.reconnects = host, port, None, -1

    def _connect(self):
        self.sock = socket.create_connection((self.host, self.port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reconnects += 1

    def request(self, method, path, body=None):
        data = _request_bytes(self.host, self.port, method, path, body, True)
        for attempt in range(2):
            if self.sock is None:
                self._connect()
            t0 = time.perf_counter()
            try:
                self.sock.sendall(data)
                r = _read_response(self.sock, t0)
            except (ConnectionError, BrokenPipeError, ConnectionResetError):
                # The server closed an idle keep-alive connection: retry once on a fresh one.
                self.close()
                if attempt:
                    raise
                continue
            if r.close:
                self.close()
            return r

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def http_json(method, url, obj=None, timeout=300.0):
    m = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    body = None if obj is None else json.dumps(obj).encode()
    r = once(host, port, method, path, body, timeout=timeout)
    try:
        return r.status, json.loads(r.body or b"null")
    except ValueError:
        return r.status, r.body.decode("utf-8", "replace")


def wait_http(url, seconds):
    deadline = time.monotonic() + seconds
    m = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    while time.monotonic() < deadline:
        try:
            if once(host, port, "GET", path, timeout=2).status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


# -------------------------------------------------------------------------------------- wrk ---

UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def parse_dur_us(s):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", s.strip())
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(text):
    out = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    out["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        out[f"p{pct}_us"] = parse_dur_us(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def cmd_wrk(a):
    meta = dict(kv.split("=", 1) for kv in a.meta)
    cpu_pids = dict(kv.split("=", 1) for kv in a.cpu)
    before = {k: cpu_ticks(int(p)) for k, p in cpu_pids.items()}
    la0 = loadavg()
    t0 = time.monotonic()
    p = subprocess.run(a.wrk, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = {k: cpu_ticks(int(p_)) for k, p_ in cpu_pids.items()}
    rec = dict(meta)
    rec.update(parse_wrk(p.stdout))
    rec["wall_s"] = wall
    rec["load0"], rec["load1"] = la0, loadavg()
    rec["cpu_us_per_req"] = {}
    for k in cpu_pids:
        if before[k] is not None and after[k] is not None and rec["requests"]:
            rec["cpu_us_per_req"][k] = (after[k] - before[k]) / CLK_TCK * 1e6 / rec["requests"]
    if a.raw:
        with open(a.raw, "w") as f:
            f.write(" ".join(a.wrk) + "\n" + p.stdout + p.stderr)
    if p.returncode != 0 or rec["rps"] is None:
        sys.stderr.write(f"wrk failed ({p.returncode}): {p.stderr}\n{p.stdout}\n")
        rec["failed"] = True
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    errs = rec["non2xx"] + rec["socket_errors"]
    print(f"  {meta.get('group', '')} c={meta.get('conns', '')} {meta.get('variant', ''):<9} "
          f"{rec['rps'] or 0:>9.0f} req/s  p50 {rec['p50_us'] or 0:>8.1f} us  "
          f"p99 {rec['p99_us'] or 0:>8.1f} us" + (f"  ERRORS {errs}" if errs else "")
          + f"  cpu/req {json.dumps({k: round(v, 1) for k, v in rec['cpu_us_per_req'].items()})}",
          flush=True)


def cmd_overhead(a):
    """Summarises llmvisor's own proxy-overhead histogram (cumulative since the daemon started)."""
    st, text = http_json("GET", a.url)
    if not isinstance(text, str):
        text = json.dumps(text)
    buckets, total, count = [], None, None
    for line in text.splitlines():
        m = re.match(r'llmvisor_proxy_overhead_seconds_bucket\{.*le="([^"]+)".*\} (\S+)', line)
        if m:
            buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)),
                            float(m.group(2))))
        m = re.match(r"llmvisor_proxy_overhead_seconds_sum(?:\{[^}]*\})? (\S+)", line)
        if m:
            total = float(m.group(1))
        m = re.match(r"llmvisor_proxy_overhead_seconds_count(?:\{[^}]*\})? (\S+)", line)
        if m:
            count = float(m.group(1))
    if not count:
        print("no proxy overhead histogram")
        return
    half = next(le for le, n in buckets if n >= count / 2)
    p99 = next(le for le, n in buckets if n >= count * 0.99)
    below = {le: n / count for le, n in buckets}
    text = (f"llmvisor's own `llmvisor_proxy_overhead_seconds` histogram over the whole run: "
            f"{int(count):,} proxied requests, mean {total / count * 1e6:.1f} µs, median in the bucket "
            f"≤ {half * 1e6:g} µs, p99 ≤ {p99 * 1e6:g} µs; share ≤ 25 µs: "
            f"{below.get(0.000025, 0) * 100:.0f} %, ≤ 100 µs: {below.get(0.0001, 0) * 100:.0f} %.")
    with open(a.record, "a") as f:
        f.write(json.dumps({"kind": "metric", "text": text}) + "\n")
    print(text)


# ------------------------------------------------------------------------------- statistics ---

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    """(min, max) relative to the median, in percent."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0, 0.0
    m = statistics.median(xs)
    return (min(xs) / m - 1) * 100, (max(xs) / m - 1) * 100


def fmt_us(x):
    if x is None:
        return "–"
    if abs(x) >= 10000:
        return f"{x / 1000:.1f} ms"
    if abs(x) >= 1000:
        return f"{x / 1000:.2f} ms"
    return f"{x:.0f} µs"


def fmt_signed_us(x):
    if x is None:
        return "–"
    s = "+" if x >= 0 else "−"
    return s + fmt_us(abs(x))


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def wrk_table(recs, baseline="direct", notes=None):
    """Markdown table of wrk records grouped by (group, conns), variants side by side."""
    notes = notes or {}
    groups = []
    for r in recs:
        k = (r["group"], int(r["conns"]))
        if k not in groups:
            groups.append(k)
    lines = ["| request | conns | variant | req/s | vs direct (paired) | p50 | p50 added | p99 | "
             "CPU per request | rounds, req/s spread |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, c in groups:
        rs = [r for r in recs if r["group"] == g and int(r["conns"]) == c and not r.get("failed")]
        variants = []
        for r in rs:
            if r["variant"] not in variants:
                variants.append(r["variant"])
        by_round = {}
        for r in rs:
            by_round.setdefault(int(r["round"]), {})[r["variant"]] = r
        for v in variants:
            vr = [r for r in rs if r["variant"] == v]
            rps = [r["rps"] for r in vr]
            ratio, added = [], []
            for rnd, d in by_round.items():
                if v in d and baseline in d:
                    ratio.append(d[v]["rps"] / d[baseline]["rps"])
                    added.append(d[v]["p50_us"] - d[baseline]["p50_us"])
            cpu = {}
            for r in vr:
                for k, x in r.get("cpu_us_per_req", {}).items():
                    cpu.setdefault(k, []).append(x)
            cpu_s = ", ".join(f"{k} {med(x):.1f} µs" for k, x in cpu.items()) or "–"
            lo, hi = spread(rps)
            errs = sum(r["non2xx"] + r["socket_errors"] for r in vr)
            label = v + (f" ({notes[(g, v)]})" if (g, v) in notes else "")
            lines.append(
                f"| {g} | {c} | {label} | {med(rps):,.0f} | "
                + ("—" if v == baseline else f"{med(ratio):.2f}×")
                + f" | {fmt_us(med([r['p50_us'] for r in vr]))} | "
                + ("—" if v == baseline else fmt_signed_us(med(added)))
                + f" | {fmt_us(med([r['p99_us'] for r in vr]))} | {cpu_s} | "
                f"{len(vr)}, {lo:+.0f}/{hi:+.0f} %" + (f", **{errs} errors**" if errs else "") + " |")
    return "\n".join(lines)


def load_range(recs):
    xs = [r[k] for r in recs for k in ("load0", "load1") if k in r]
    return (min(xs), max(xs)) if xs else (None, None)


def cmd_report_proxy(a):
    recs = [r for r in load_jsonl(a.file) if r.get("kind") == "wrk"]
    extra = load_jsonl(a.extra) if a.extra else []
    notes = {("GET /small", "daemon-only"): "llmvisor `GET /healthz`, no upstream"}
    print("#### Throughput and latency (wrk, medians over rounds)\n")
    print(wrk_table(recs, notes=notes))
    lo, hi = load_range(recs)
    print(f"\nLoad average (1 min) sampled around every wrk run: {lo:.2f} – {hi:.2f}.")
    rss = [r for r in extra if r.get("kind") == "rss"]
    if rss:
        print("\n#### Resident memory (VmRSS)\n")
        print("| process | when | VmRSS |")
        print("|---|---|---|")
        for r in rss:
            print(f"| {r['process']} | {r['when']} | {r['kb'] / 1024:.1f} MiB |")
    mt = [r for r in extra if r.get("kind") == "metric"]
    for r in mt:
        print(f"\n{r['text']}")


# ------------------------------------------------------------------------------------ llama ---

def chat_body(model):
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }).encode()


class Variants:
    """How to reach, start and stop the model in each of the three set-ups."""

    def __init__(self, a):
        self.a = a
        self.model = a.model
        self.body = chat_body(a.model)
        self.direct_cmd = json.loads(a.direct_cmd)
        self.direct_proc = None
        self.direct_log = open(a.direct_log, "ab")

    # --- the model's server started by hand -------------------------------------------------
    def direct_start_and_wait(self, t0):
        """Spawns llama-server, polls /health every poll_ms until 200. Returns (t_ready, polls)."""
        self.direct_proc = subprocess.Popen(
            self.direct_cmd, stdin=subprocess.DEVNULL, stdout=self.direct_log,
            stderr=subprocess.STDOUT, start_new_session=True)
        polls = 0
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            polls += 1
            try:
                r = once("127.0.0.1", self.a.direct_port, "GET", "/health", timeout=2)
                if r.status == 200:
                    return time.perf_counter() - t0, polls
            except OSError:
                pass
            if self.direct_proc.poll() is not None:
                raise RuntimeError(f"direct llama-server exited: {self.direct_proc.returncode}")
            time.sleep(self.a.poll_ms / 1000)
        raise RuntimeError("direct llama-server did not become ready in 120 s")

    def direct_stop(self):
        p = self.direct_proc
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.direct_proc = None

    # --- llmvisor ----------------------------------------------------------------------------
    def lv(self, path):
        return f"http://127.0.0.1:{self.a.llmvisor_port}{path}"

    def lv_state(self):
        st, obj = http_json("GET", self.lv(f"/api/models/{self.model}"))
        return obj

    def lv_stop(self):
        before = self.lv_state()
        st, obj = http_json("POST", self.lv(f"/api/models/{self.model}/unload"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = self.lv_state()
            if s["state"] == "stopped" and (before["pid"] is None or not alive(before["pid"])):
                return
            time.sleep(0.02)
        raise RuntimeError(f"llmvisor did not unload: {s}")

    def lv_load(self):
        st, obj = http_json("POST", self.lv(f"/api/models/{self.model}/load"))
        if st != 200:
            raise RuntimeError(f"llmvisor load: {st} {obj}")
        return obj

    # --- llama.cpp router mode ---------------------------------------------------------------
    def rt(self, path):
        return f"http://127.0.0.1:{self.a.router_port}{path}"

    def rt_status(self):
        st, obj = http_json("GET", self.rt("/models"))
        for m in obj["data"]:
            if m["id"] == self.model:
                return m["status"]["value"]
        raise RuntimeError(f"router does not list {self.model}: {obj}")

    def rt_stop(self):
        if self.rt_status() != "unloaded":
            http_json("POST", self.rt("/models/unload"), {"model": self.model})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.rt_status() == "unloaded" and not children_of(self.a.router_pid):
                return
            time.sleep(0.02)
        raise RuntimeError("router did not unload its model")

    def rt_load(self):
        http_json("POST", self.rt("/models/load"), {"model": self.model})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.rt_status() == "loaded":
                return
            time.sleep(0.02)
        raise RuntimeError("router did not load the model")

    # --- the server's own "model loaded" time, from its log --------------------------------
    def server_log(self, variant):
        if variant == "llmvisor":
            st, text = http_json("GET", self.lv(f"/api/models/{self.model}/logs"))
            return text if isinstance(text, str) else ""
        path = self.a.direct_log if variant == "direct" else self.a.router_log
        with open(path, errors="replace") as f:
            return f.read()

    def loaded_at(self, variant, seen_before):
        """The 'model loaded' time of the start just measured: the first one logged after
        `seen_before` such lines (waits up to 2 s for the log to catch up); None if not found."""
        deadline = time.monotonic() + 2
        while True:
            times = loaded_times(self.server_log(variant))
            if len(times) > seen_before:
                return times[-1]
            if time.monotonic() > deadline:
                # llmvisor's log view is a ring of the last lines: once full, the count of
                # matches stops growing, but the newest line is still the last one.
                return times[-1] if variant == "llmvisor" and times else None
            time.sleep(0.05)

    # --- one cold start ----------------------------------------------------------------------
    def cold(self, variant):
        rec = {"kind": "cold", "variant": variant, "load": loadavg()}
        seen = len(loaded_times(self.server_log(variant)))
        if variant == "direct":
            t0 = time.perf_counter()
            rec["ready_s"], rec["polls"] = self.direct_start_and_wait(t0)
            r = once("127.0.0.1", self.a.direct_port, "POST", "/v1/chat/completions",
                     self.body, t0=t0)
        elif variant == "llmvisor":
            t0 = time.perf_counter()
            r = once("127.0.0.1", self.a.llmvisor_port, "POST", "/v1/chat/completions",
                     self.body, t0=t0)
            rec["ready_ms_reported"] = self.lv_state().get("ready_ms")
        elif variant == "router":
            t0 = time.perf_counter()
            r = once("127.0.0.1", self.a.router_port, "POST", "/v1/chat/completions",
                     self.body, t0=t0)
        if r.status != 200 or b"choices" not in r.body:
            raise RuntimeError(f"{variant}: cold request failed: {r.status} {r.body[:300]!r}")
        rec["first_byte_s"], rec["total_s"] = r.t_first, r.t_end
        rec["server_loaded_s"] = self.loaded_at(variant, seen)
        return rec

    def stop(self, variant):
        {"direct": self.direct_stop, "llmvisor": self.lv_stop, "router": self.rt_stop}[variant]()

    # --- hot requests ------------------------------------------------------------------------
    def targets(self, what):
        """(port, method, path, body) per variant for a hot request of kind `what`."""
        m = self.model
        if what == "chat":
            return {
                "direct": (self.a.direct_port, "POST", "/v1/chat/completions", self.body),
                "llmvisor": (self.a.llmvisor_port, "POST", "/v1/chat/completions", self.body),
                "router": (self.a.router_port, "POST", "/v1/chat/completions", self.body),
            }
        if what == "props":
            return {
                "direct": (self.a.direct_port, "GET", "/props", None),
                "llmvisor": (self.a.llmvisor_port, "GET", f"/upstream/{m}/props", None),
                "router": (self.a.router_port, "GET", f"/props?model={m}", None),
            }
        raise ValueError(what)


VARIANTS = ["direct", "llmvisor", "router"]

# llama-server's own log: "M.SS.mmm.uuu I srv  llama_server: model loaded", the time since that
# process started logging (router children's lines carry a "[port] " prefix).
LOADED_RE = re.compile(r"(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) I srv\s+\S+: model loaded")


def loaded_times(text):
    """Every 'model loaded' time in a llama-server log, in seconds since that server started."""
    return [int(a) * 60 + int(b) + int(c) / 1e3 + int(d) / 1e6
            for a, b, c, d in LOADED_RE.findall(text)]


def rotate(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


def cmd_cold(a):
    v = Variants(a)
    out = open(a.out, "a")
    try:
        for variant in VARIANTS:  # every variant starts from "not loaded"
            v.stop(variant)
        for rnd in range(a.rounds):
            for variant in rotate(VARIANTS, rnd):
                time.sleep(a.settle)
                rec = v.cold(variant)
                rec["round"] = rnd
                out.write(json.dumps(rec) + "\n")
                out.flush()
                extra = ""
                if "ready_s" in rec:
                    extra = f"  (health 200 at {rec['ready_s'] * 1000:.0f} ms, {rec['polls']} polls)"
                if rec.get("ready_ms_reported") is not None:
                    extra = f"  (llmvisor ready_ms {rec['ready_ms_reported']})"
                if rec["server_loaded_s"] is not None:
                    extra += f"  [server: model loaded at {rec['server_loaded_s'] * 1000:.0f} ms]"
                print(f"  cold round {rnd} {variant:<9} first byte {rec['first_byte_s'] * 1000:7.1f} ms"
                      f"{extra}  load {rec['load']:.2f}", flush=True)
                v.stop(variant)
    finally:
        v.direct_stop()


def cmd_hot(a):
    """Hot latency. The direct server must already be running on --direct-port (bench/llama.sh
    starts it); llmvisor's and the router's copies are loaded here."""
    v = Variants(a)
    out = open(a.out, "a")
    v.lv_load()
    v.rt_load()
    for what, n in (("chat", a.chat_n), ("props", a.props_n)):
        t = v.targets(what)
        conns = {k: KeepAlive("127.0.0.1", t[k][0]) for k in VARIANTS}
        for k in VARIANTS:  # warm-up, not recorded
            for _ in range(a.warmup):
                r = conns[k].request(*t[k][1:])
                if r.status != 200:
                    raise RuntimeError(f"{what} {k}: {r.status} {r.body[:300]!r}")
        for rnd in range(a.rounds):
            lat = {k: [] for k in VARIANTS}
            la = loadavg()
            for i in range(n):
                for k in rotate(VARIANTS, i + rnd):
                    r = conns[k].request(*t[k][1:])
                    if r.status != 200:
                        raise RuntimeError(f"{what} {k}: {r.status} {r.body[:300]!r}")
                    lat[k].append(r.t_end * 1e6)
            rec = {"kind": "hot", "what": what, "round": rnd, "n": n, "load": la,
                   "median_us": {k: med(lat[k]) for k in VARIANTS},
                   "p90_us": {k: sorted(lat[k])[int(0.9 * (n - 1))] for k in VARIANTS},
                   "reconnects": {k: conns[k].reconnects for k in VARIANTS}}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(f"  hot {what} round {rnd}: " + ", ".join(
                f"{k} {fmt_us(rec['median_us'][k])}" for k in VARIANTS) + f"  load {la:.2f}",
                flush=True)
        for c in conns.values():
            c.close()


def cmd_report_llama(a):
    recs = load_jsonl(a.file)
    extra = load_jsonl(a.extra) if a.extra else []
    cold = [r for r in recs if r.get("kind") == "cold"]
    if cold:
        print("#### Cold start: request for a model that is not loaded → first byte of the answer\n")
        print("| variant | first byte, median | min – max | vs direct (paired ratio) | "
              "minus direct (paired) | server ready (health 200), median | loads |")
        print("|---|---|---|---|---|---|---|")
        by_round = {}
        for r in cold:
            by_round.setdefault(r["round"], {})[r["variant"]] = r
        for v in VARIANTS:
            vr = [r for r in cold if r["variant"] == v]
            fb = [r["first_byte_s"] * 1000 for r in vr]
            ratio = [d[v]["first_byte_s"] / d["direct"]["first_byte_s"]
                     for d in by_round.values() if v in d and "direct" in d]
            diff = [(d[v]["first_byte_s"] - d["direct"]["first_byte_s"]) * 1000
                    for d in by_round.values() if v in d and "direct" in d]
            ready = None
            if v == "direct":
                ready = f"{med([r['ready_s'] * 1000 for r in vr]):.0f} ms (polled every {a.poll_ms} ms)"
            elif v == "llmvisor":
                ready = f"{med([r['ready_ms_reported'] for r in vr]):.0f} ms (its `ready_ms`)"
            else:
                ready = "–"
            print(f"| {v} | {med(fb):.1f} ms | {min(fb):.1f} – {max(fb):.1f} ms | "
                  + ("—" if v == "direct" else f"{med(ratio):.3f}× ({(med(ratio) - 1) * 100:+.1f} %)")
                  + " | " + ("—" if v == "direct" else f"{med(diff):+.1f} ms")
                  + f" | {ready} | {len(vr)} |")
        lr = [r["load"] for r in cold]
        print(f"\nLoad average (1 min) at the cold starts: {min(lr):.2f} – {max(lr):.2f}.")
        if all(r.get("server_loaded_s") is not None for r in cold):
            print("\n#### Cold start minus the server's own load time\n")
            print("First byte minus the moment that llama-server logged `model loaded` (its own "
                  "clock, from its start): what is left is process start-up before its log "
                  "clock, seeing it ready, forwarding, and the 1-token answer (the same work "
                  "for all). This takes the model load's run-to-run noise out.\n")
            print("| variant | first byte − model loaded, median | min – max | minus direct (paired) "
                  "| minus router (paired) | model load itself, median |")
            print("|---|---|---|---|---|---|")
            for v in VARIANTS:
                vr = [r for r in cold if r["variant"] == v]
                after = [(r["first_byte_s"] - r["server_loaded_s"]) * 1000 for r in vr]

                def paired(base):
                    return med([(d[v]["first_byte_s"] - d[v]["server_loaded_s"]
                                 - d[base]["first_byte_s"] + d[base]["server_loaded_s"]) * 1000
                                for d in by_round.values() if v in d and base in d])
                print(f"| {v} | {med(after):.1f} ms | {min(after):.1f} – {max(after):.1f} ms | "
                      + ("—" if v == "direct" else f"{paired('direct'):+.1f} ms") + " | "
                      + ("—" if v == "router" else f"{paired('router'):+.1f} ms")
                      + f" | {med([r['server_loaded_s'] * 1000 for r in vr]):.0f} ms |")
    hot = [r for r in recs if r.get("kind") == "hot"]
    for what, title in (("chat", "Hot `POST /v1/chat/completions` (max_tokens 1, same prompt)"),
                        ("props", "Hot small proxied `GET /props` (~2 KB JSON)")):
        hr = [r for r in hot if r["what"] == what]
        if not hr:
            continue
        print(f"\n#### {title}: one keep-alive connection per variant, requests interleaved\n")
        print("| variant | latency, median of round medians | added vs direct (paired) | "
              "p90 (median over rounds) | round medians min – max |")
        print("|---|---|---|---|---|")
        for v in VARIANTS:
            ms = [r["median_us"][v] for r in hr]
            added = [r["median_us"][v] - r["median_us"]["direct"] for r in hr]
            print(f"| {v} | {fmt_us(med(ms))} | "
                  + ("—" if v == "direct" else fmt_signed_us(med(added)))
                  + f" | {fmt_us(med([r['p90_us'][v] for r in hr]))} | "
                  f"{fmt_us(min(ms))} – {fmt_us(max(ms))} |")
        print(f"\n{len(hr)} rounds × {hr[0]['n']} requests per variant; load average "
              f"{min(r['load'] for r in hr):.2f} – {max(r['load'] for r in hr):.2f}.")
    wr = [r for r in recs if r.get("kind") == "wrk"]
    if wr:
        print("\n#### Throughput of a small GET (wrk, medians over rounds)\n")
        notes = {("GET /health", "router"): "answered by the router itself, not proxied"}
        print(wrk_table(wr, notes=notes))
        lo, hi = load_range(wr)
        print(f"\nLoad average (1 min) around the wrk runs: {lo:.2f} – {hi:.2f}.")
    rss = [r for r in extra if r.get("kind") == "rss"]
    if rss:
        print("\n#### Resident memory (VmRSS, the process itself, children not included)\n")
        print("| process | when | VmRSS |")
        print("|---|---|---|")
        for r in rss:
            print(f"| {r['process']} | {r['when']} | {r['kb'] / 1024:.1f} MiB |")


# ------------------------------------------------------------------------------------- main ---

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p = sub.add_parser("port-range")
    p.add_argument("n", type=int)
    p = sub.add_parser("wait-http")
    p.add_argument("url")
    p.add_argument("seconds", type=float, nargs="?", default=30)
    p = sub.add_parser("rss")
    p.add_argument("pid", type=int)
    p.add_argument("--record", help="append {kind: rss, ...} to this JSONL file")
    p.add_argument("--process", default="")
    p.add_argument("--when", default="")
    p = sub.add_parser("http")
    p.add_argument("method")
    p.add_argument("url")
    p.add_argument("--json", help="JSON request body")
    p.add_argument("--field", help="print only this field of the JSON answer")
    p = sub.add_parser("overhead")
    p.add_argument("url", help="llmvisor's /metrics")
    p.add_argument("--record", required=True)
    p = sub.add_parser("wrk")
    p.add_argument("--out", required=True)
    p.add_argument("--raw")
    p.add_argument("--meta", action="append", default=[])
    p.add_argument("--cpu", action="append", default=[])
    p.add_argument("wrk", nargs=argparse.REMAINDER)
    for name in ("cold", "hot"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--model", required=True)
        p.add_argument("--direct-cmd", required=True, help="JSON array")
        p.add_argument("--direct-port", type=int, required=True)
        p.add_argument("--direct-log", required=True)
        p.add_argument("--llmvisor-port", type=int, required=True)
        p.add_argument("--router-port", type=int, required=True)
        p.add_argument("--router-pid", type=int, required=True)
        p.add_argument("--router-log", required=True)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--poll-ms", type=float, default=10)
        p.add_argument("--settle", type=float, default=0.5)
        p.add_argument("--chat-n", type=int, default=40)
        p.add_argument("--props-n", type=int, default=200)
        p.add_argument("--warmup", type=int, default=10)
    p = sub.add_parser("children")
    p.add_argument("pid", type=int)
    p = sub.add_parser("report-proxy")
    p.add_argument("file")
    p.add_argument("--extra")
    p = sub.add_parser("report-llama")
    p.add_argument("file")
    p.add_argument("--extra")
    p.add_argument("--poll-ms", default="10")
    a = ap.parse_args()

    if a.cmd == "ports":
        print(" ".join(map(str, free_ports(a.n))))
    elif a.cmd == "port-range":
        print("%d %d" % free_range(a.n))
    elif a.cmd == "wait-http":
        sys.exit(0 if wait_http(a.url, a.seconds) else 1)
    elif a.cmd == "rss":
        kb = rss_kb(a.pid)
        if a.record:
            with open(a.record, "a") as f:
                f.write(json.dumps({"kind": "rss", "process": a.process, "when": a.when,
                                    "kb": kb, "hwm_kb": hwm_kb(a.pid)}) + "\n")
        print(kb)
    elif a.cmd == "http":
        st, obj = http_json(a.method, a.url, json.loads(a.json) if a.json else None)
        if a.field:
            print(obj.get(a.field) if isinstance(obj, dict) else "")
        else:
            print(st, json.dumps(obj) if not isinstance(obj, str) else obj)
        sys.exit(0 if 200 <= st < 300 else 1)
    elif a.cmd == "overhead":
        cmd_overhead(a)
    elif a.cmd == "wrk":
        if a.wrk and a.wrk[0] == "--":
            a.wrk = a.wrk[1:]
        cmd_wrk(a)
    elif a.cmd == "children":
        print(" ".join(map(str, children_of(a.pid))))
    elif a.cmd == "cold":
        cmd_cold(a)
    elif a.cmd == "hot":
        cmd_hot(a)
    elif a.cmd == "report-proxy":
        cmd_report_proxy(a)
    elif a.cmd == "report-llama":
        cmd_report_llama(a)


if __name__ == "__main__":
    main()
