"""The chat app's scenarios, in one process, against the fake server."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

import llmvisor
from conftest import WORKSPACE
from helpers import alive


def run_threads(n, target):
    """Runs `target(i)` on `n` threads released together; returns their results (or raises the
    first exception)."""
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def body(i):
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_ten_threads_on_one_model_start_one_server_and_share_its_url(sup_factory, scratch):
    sup = sup_factory({"m": "--startup-delay 300ms"})
    urls = run_threads(10, lambda i: sup.ensure_server_running("m"))
    assert len(set(urls)) == 1, urls
    assert urls[0].startswith("http://127.0.0.1:")
    assert len(scratch.pids("m")) == 1
    [status] = sup.status()
    assert status["state"] == "ready"
    assert status["leases"] == 1  # the one app lease, however many threads asked


def test_two_models_times_ten_threads_load_in_parallel(sup_factory, scratch):
    delay = 1.5
    sup = sup_factory({"a": f"--startup-delay {delay}s", "b": f"--startup-delay {delay}s"})
    began = time.monotonic()
    urls = run_threads(20, lambda i: sup.ensure_server_running("ab"[i % 2]))
    wall = time.monotonic() - began
    assert len(set(urls)) == 2
    assert len(scratch.pids("a")) == 1 and len(scratch.pids("b")) == 1
    # One load takes `delay` plus spawn and polling; two in a row would take twice that.
    assert wall < 2 * delay, f"two models took {wall:.2f}s: not loaded in parallel"


def test_a_ready_model_answers_at_once_while_another_loads(sup_factory):
    sup = sup_factory({"ready": "", "slow": "--startup-delay 3s"})
    sup.ensure_server_running("ready")
    loading = threading.Thread(target=sup.ensure_server_running, args=("slow",))
    loading.start()
    try:
        while sup.status()[1]["state"] != "starting":  # status() is in id order: ready, slow
            time.sleep(0.005)
        took = []
        for _ in range(200):
            t = time.perf_counter()
            sup.ensure_server_running("ready")
            took.append(time.perf_counter() - t)
        took.sort()
        p99 = took[197]
        assert sup.status()[1]["state"] == "starting"
        # The issue asks < 5 ms; a generous bound on a shared 2-core machine. The real figure
        # (about 1 µs) is in docs/benchmarks.md, from bench/python_ensure.py.
        assert p99 < 0.05, f"p99 {p99 * 1e3:.2f} ms"
    finally:
        loading.join()


def test_log_callback_gets_the_servers_lines_while_it_loads(sup_factory):
    sup = sup_factory({"m": "--log-lines 3 --startup-delay 200ms"})
    lines = []
    caller = threading.get_ident()
    threads = []

    def callback(line):
        threads.append(threading.get_ident())
        lines.append(line)

    sup.ensure_server_running("m", log_callback=callback)
    got = list(lines)
    assert [f"fake-llm log line {i}" for i in (1, 2, 3)] == [l for l in got if "log line" in l]
    assert set(threads) == {caller}
    time.sleep(0.2)
    assert lines == got, "log_callback was called after ensure_server_running returned"
    # logs() has them too.
    assert "fake-llm log line 3" in sup.logs("m")


def test_a_bad_config_raises_config_error_with_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[models.a]\ncmd = ["x", "--port", "${PORT}"]\nttl = "forever"\n')
    with pytest.raises(llmvisor.ConfigError) as err:
        llmvisor.Supervisor(path)
    text = str(err.value)
    assert text.startswith(f'{path}:3:7: error: invalid duration "forever"'), text
    assert "help:" in text
    # The same text as `llmvisor check`, when the binary is built (scripts/test.sh builds it).
    binary = WORKSPACE / "target" / "debug" / "llmvisor"
    if binary.exists():
        check = subprocess.run(
            [str(binary), "check", "--config", str(path)], capture_output=True, text=True
        )
        assert check.returncode == 1
        assert check.stderr.strip() == text


def test_config_text_errors_name_the_config_and_state_dir_overrides(sup_factory, scratch, tmp_path):
    with pytest.raises(llmvisor.ConfigError, match=r"^<config>:1:1: error: unknown key"):
        llmvisor.Supervisor(config_text="colour = 1\n")
    other = tmp_path / "elsewhere"
    sup = llmvisor.Supervisor(config_text=scratch.config_text({"m": ""}), state_dir=other)
    try:
        assert str(sup.state_dir) == str(other)
    finally:
        sup.close()


def test_unknown_model_is_a_key_error_naming_the_known_ones(sup_factory):
    sup = sup_factory({"alpha": "", "beta": ""})
    with pytest.raises(KeyError) as err:
        sup.ensure_server_running("gamma")
    assert isinstance(err.value, llmvisor.UnknownModelError)
    assert "alpha, beta" in str(err.value)
    assert err.value.known == ["alpha", "beta"]


def test_close_stops_every_server_and_later_calls_fail(sup_factory, scratch):
    sup = sup_factory({"a": "", "b": ""})
    sup.ensure_server_running("a")
    with sup.lease("b") as lease:
        assert lease.active
    pids = scratch.all_pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    sup.close()
    assert not any(alive(p) for p in pids)
    sup.close()  # idempotent
    with pytest.raises(llmvisor.ClosedError):
        sup.ensure_server_running("a")
