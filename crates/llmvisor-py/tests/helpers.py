"""Process helpers shared by the tests and their subprocesses (importable by multiprocessing's
spawned workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def pids_in(path: Path) -> list[int]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split() if line.strip().isdigit()]


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_gone(pids, within: float) -> float:
    """Waits until none of `pids` runs; returns how long that took. Fails after `within`.
    (Polling /proc is the only way to learn that a process that is not our child ended.)"""
    start = time.monotonic()
    while True:
        left = [p for p in pids if alive(p)]
        if not left:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"still running after {within}s: {left}")
        time.sleep(0.01)


def wait_for_file_line(path: Path, within: float) -> list[int]:
    """Waits until the pid file `path` has a line; returns its pids."""
    start = time.monotonic()
    while True:
        pids = pids_in(path)
        if pids:
            return pids
        if time.monotonic() - start > within:
            raise AssertionError(f"{path} got no pid within {within}s")
        time.sleep(0.01)


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def supervisor_worker(config_path: str, conn) -> None:
    """A chat-app process (run by multiprocessing): one Supervisor on the shared state dir,
    driven by commands on `conn`."""
    import urllib.request

    import llmvisor

    sup = llmvisor.Supervisor(config_path)
    conn.send(("up", os.getpid()))
    while True:
        cmd = conn.recv()
        try:
            if cmd == "ensure":
                url = sup.ensure_server_running("m", timeout=60)
                with urllib.request.urlopen(url + "/health", timeout=10) as resp:
                    conn.send(("ok", url, resp.status))
            elif cmd == "close":
                sup.close()
                conn.send(("closed",))
                return
        except Exception as e:  # noqa: BLE001 - reported to the test
            conn.send(("error", repr(e), sup.status(), sup.logs("m")[-5:]))
