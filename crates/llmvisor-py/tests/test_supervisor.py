"""The chat app's scenarios, in one process, against the fake server."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

import llmvisor
from conftest import WORKSPACE
from helpers import alive, wait_gone


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


def test_lease_holds_the_model_and_shutdown_server_waits_for_it(sup_factory, scratch):
    sup = sup_factory({"m": ""})
    url = sup.ensure_server_running("m")
    lease = sup.lease("m", timeout=30)
    assert lease.url == url and lease.model == "m"
    assert sup.status()[0]["leases"] == 2
    stopped = threading.Event()

    def stop():
        sup.shutdown_server("m")
        stopped.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    # shutdown_server gave up the app lease and now waits for ours.
    assert not stopped.wait(0.5)
    assert sup.status()[0]["state"] in ("ready", "stopping")
    assert alive(scratch.pids("m")[0])
    with lease:
        pass  # leaving the block releases it
    assert stopped.wait(10)
    stopper.join()
    assert sup.status()[0]["state"] == "stopped"
    assert not alive(scratch.pids("m")[0])
    assert not lease.active


def test_force_shutdown_does_not_wait_for_leases(sup_factory, scratch):
    sup = sup_factory({"m": ""})
    with sup.lease("m") as lease:
        sup.shutdown_server("m", force=True)
        assert not lease.active
    assert sup.status()[0]["state"] == "stopped"
    # And it starts again on demand.
    assert sup.ensure_server_running("m").startswith("http://")
    assert len(scratch.pids("m")) == 2


def test_aliases_name_the_same_server(sup_factory):
    sup = sup_factory({"gemma-3-270m": ""}, model_extra='aliases = ["gemma"]')
    assert sup.ensure_server_running("gemma") == sup.ensure_server_running("gemma-3-270m")
    assert sup.status()[0]["leases"] == 1


def test_a_server_that_cannot_start_raises_start_error_with_its_output(sup_factory):
    sup = sup_factory({"bad": "--log-lines 2 --exit-at-startup 7"})
    with pytest.raises(llmvisor.StartError) as err:
        sup.ensure_server_running("bad")
    text = str(err.value)
    assert "model `bad` failed to start" in text
    assert "fake-llm log line 2" in text or "exit" in text
    assert err.value.model == "bad"
    assert err.value.reason
    assert isinstance(err.value.log_tail, list)


def test_start_timeout_is_a_timeout_error(sup_factory):
    sup = sup_factory({"slow": "--startup-delay 30s"}, model_extra='startup_timeout = "1s"')
    with pytest.raises(TimeoutError) as err:
        sup.ensure_server_running("slow")
    assert isinstance(err.value, llmvisor.StartTimeoutError)
    assert "did not become ready within" in str(err.value)


def test_the_callers_timeout_bounds_the_wait_and_the_start_goes_on(sup_factory, scratch):
    # Loading until the test creates the ready file: still starting however slow the machine.
    ready = scratch.root / "slow.ready"
    sup = sup_factory({"slow": f"--ready-file {ready}"})
    began = time.monotonic()
    with pytest.raises(llmvisor.StartTimeoutError, match="within the 0.3s timeout"):
        sup.ensure_server_running("slow", timeout=0.3)
    assert time.monotonic() - began < 5  # the caller's 0.3 s, not the startup_timeout (30 s)
    assert sup.status()[0]["state"] == "starting"
    assert sup.status()[0]["leases"] == 0
    ready.touch()
    sup.ensure_server_running("slow")
    assert len(scratch.pids("slow")) == 1


def test_asyncio_acquire_and_lease_async(sup_factory):
    import asyncio

    sup = sup_factory({"a": "--startup-delay 300ms", "b": "--startup-delay 300ms"})

    async def main():
        async with sup.lease_async("a") as lease_a:
            lease_b = await sup.acquire("b")
            both = await asyncio.gather(*(sup.acquire(m) for m in "abab"))
            assert {l.url for l in both} == {lease_a.url, lease_b.url}
            leases = {s["id"]: s["leases"] for s in sup.status()}
            assert leases == {"a": 3, "b": 3}
            for l in both:
                l.release()
            lease_b.release()
        return {s["id"]: s["leases"] for s in sup.status()}

    assert asyncio.run(main()) == {"a": 0, "b": 0}


def test_the_global_manager_is_one_per_process(scratch):
    path = scratch.write_config({"m": ""})
    got = run_threads(8, lambda i: llmvisor.get_global_server_manager(path))
    try:
        assert all(s is got[0] for s in got)
        assert llmvisor.get_global_server_manager() is got[0]
        with pytest.raises(ValueError):
            llmvisor.get_global_server_manager(config_text=scratch.config_text({"x": ""}))
    finally:
        got[0].close()
    fresh = llmvisor.get_global_server_manager(path)
    try:
        assert fresh is not got[0]
    finally:
        fresh.close()


def test_context_manager_closes(scratch):
    with llmvisor.Supervisor(config_text=scratch.config_text({"m": ""})) as sup:
        sup.ensure_server_running("m")
        [pid] = scratch.pids("m")
        assert alive(pid)
    assert sup.closed
    assert not alive(pid)


def test_an_exception_in_log_callback_propagates_and_leaks_no_lease(sup_factory, scratch):
    sup = sup_factory({"m": "--log-lines 2 --startup-delay 500ms"})

    def broken(line):
        raise RuntimeError("the UI is gone")

    with pytest.raises(RuntimeError, match="the UI is gone"):
        sup.ensure_server_running("m", log_callback=broken)
    assert sup.status()[0]["leases"] == 0
    # The start went on; the next call gets the same server.
    sup.ensure_server_running("m")
    assert len(scratch.pids("m")) == 1


def test_a_caller_joining_a_start_gets_its_lines_so_far_then_the_rest(sup_factory):
    sup = sup_factory({"m": "--log-lines 3 --startup-delay 1s"})
    first = threading.Thread(target=sup.ensure_server_running, args=("m",))
    first.start()
    try:
        while "fake-llm log line 3" not in sup.logs("m"):
            time.sleep(0.005)
        assert sup.status()[0]["state"] == "starting"
        lines = []
        sup.ensure_server_running("m", log_callback=lines.append)
        assert lines[0].startswith("llmvisor: starting m (attempt 1)"), lines
        assert [l for l in lines if "log line" in l] == [f"fake-llm log line {i}" for i in (1, 2, 3)]
        assert any("ready" in l for l in lines[-2:]), lines
    finally:
        first.join()


def test_a_supervisor_garbage_collected_unclosed_kills_its_servers(scratch):
    import gc

    sup = llmvisor.Supervisor(config_text=scratch.config_text({"m": ""}))
    sup.ensure_server_running("m")
    [pid] = scratch.pids("m")
    assert alive(pid)
    del sup
    gc.collect()
    wait_gone([pid], 2.0)
