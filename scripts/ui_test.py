#!/usr/bin/env python3
"""Browser test of the dashboard (/ui/): a real `llmvisor serve` with fake-llm models, driven in
Debian's headless chromium by Playwright. Saves screenshots under docs/ui/.

Usage: ui_test.py LLMVISOR_BIN FAKE_LLM_BIN
Prints one line per check ("ok - ..." / "not ok - ...") and "ui tests: N passed, N failed";
exits 1 if any check failed. Every process it starts is stopped by pid at the end.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright, expect

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "ui"
ADMIN_KEY = "adm-ui-test"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

passed = 0
failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok - {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed check is reported, the run goes on
        failed += 1
        print(f"not ok - {name}: {e}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_config(tmp, fake):
    slow = (
        "sh -c 'echo \"load_model: loading model /m.gguf\"; sleep 1; "
        "echo \"load_tensors: loading model tensors\"; sleep 1; "
        "echo \"srv init: warming up the model\"; sleep 1; "
        f"exec {fake} --port ${{PORT}} --startup-delay 500ms'"
    )
    base = random.randint(30000, 38000)
    text = f"""
state_dir = "{tmp}/state"
port_range = [{base}, {base + 199}]
admin_keys = ["{ADMIN_KEY}"]
memory_budget = "8GiB"
preload = ["beta"]

[models.alpha]
cmd = {json.dumps(slow)}
memory = "1GiB"

[models.beta]
cmd = "{fake} --port ${{PORT}} --chunks 12 --chunk-delay 20ms --log-lines 3"
memory = "512MiB"

[models.broken]
cmd = "{fake} --port ${{PORT}} --exit-at-startup 7 --log-lines 4"
"""
    path = Path(tmp) / "llmvisor.toml"
    path.write_text(text)
    return path


def wait_healthy(url, proc, within=20):
    end = time.time() + within
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"llmvisor exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("llmvisor did not become healthy")


def chat(url, stream):
    body = json.dumps({"model": "beta", "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


def stop(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    llmvisor, fake = sys.argv[1], sys.argv[2]
    SHOTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmvisor-ui") as tmp:
        os.chmod(tmp, 0o700)
        cfg = write_config(tmp, fake)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "daemon.log", "w")
        daemon = subprocess.Popen([llmvisor, "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ok = False
        try:
            wait_healthy(url, daemon)
            run(url)
            ok = True
        except Exception as e:  # noqa: BLE001 - counted as a failure, never a silent pass
            global failed
            failed += 1
            print(f"not ok - the browser test could not run: {e}", flush=True)
        finally:
            stop(daemon)
            log.close()
            if failed or not ok:
                print((Path(tmp) / "daemon.log").read_text()[-4000:])
    print(f"ui tests: {passed} passed, {failed} failed")
    return 1 if failed else 0


def run(url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            navigations = []
            page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
            page.goto(url + "/ui/")
            card = lambda m: page.locator(f"#model-{m}")  # noqa: E731
            state = lambda m: card(m).get_by_test_id("state")  # noqa: E731

            def key_prompt():
                expect(page.locator("#key-dialog")).to_be_visible(timeout=10000)
                page.screenshot(path=str(SHOTS / "key-prompt.png"))
            check("the key prompt appears when keys are set", key_prompt)

            def wrong_key():
                page.fill("#key-input", "not-the-key")
                page.click("#key-form button[type=submit]")
                expect(page.locator("#key-error")).to_have_text("That key was refused.", timeout=10000)
                expect(page.locator("#models article")).to_have_count(0)
                page.screenshot(path=str(SHOTS / "key-refused.png"))
            check("a wrong key is refused", wrong_key)

            def every_model():
                page.fill("#key-input", ADMIN_KEY)
                page.click("#key-form button[type=submit]")
                expect(page.locator("#key-dialog")).to_be_hidden()
                for m in ["alpha", "beta", "broken"]:
                    expect(card(m)).to_be_visible(timeout=10000)
                expect(state("beta")).to_have_text("ready", timeout=20000)
                expect(state("alpha")).to_have_text("stopped")
                assert page.evaluate("sessionStorage.getItem('llmvisor-admin-key')") == ADMIN_KEY
                assert ADMIN_KEY not in page.url
            check("every configured model is shown, with the right key", every_model)

            def requests_shown():
                for stream in (False, True, True):
                    status, _ = chat(url, stream)
                    assert status == 200
                rows = page.locator("#requests tbody tr")
                expect(rows).to_have_count(3, timeout=10000)
                expect(rows.first).to_contain_text("beta")
                expect(rows.first).to_contain_text("/v1/chat/completions")
                expect(page.locator("#legend")).to_contain_text("3 req")
            check("requests appear with tokens and tokens/s", requests_shown)

            def load_live():
                card("alpha").get_by_role("button", name="Load alpha", exact=True).click()
                expect(state("alpha")).to_have_text("starting", timeout=5000)
                bar = card("alpha").locator("progress")
                page.wait_for_function(
                    "() => { const p = document.querySelector('#model-alpha progress'); return p && p.value >= 40; }",
                    timeout=10000)
                expect(bar).to_be_visible()
                page.screenshot(path=str(SHOTS / "loading.png"))
                expect(state("alpha")).to_have_text("ready", timeout=20000)
                expect(card("alpha")).to_contain_text("1.0 GiB (declared)")
                assert len(navigations) == 1, f"the page navigated: {navigations}"
                page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)
            check("load: starting → progress → ready without reloading", load_live)

            def unload():
                card("alpha").get_by_role("button", name="Unload alpha", exact=True).click()
                expect(state("alpha")).to_have_text("stopped", timeout=20000)
            check("unload from the UI", unload)

            def failed_start():
                card("broken").get_by_role("button", name="Load broken", exact=True).click()
                expect(state("broken")).to_have_text("failed", timeout=20000)
                err = card("broken").locator(".err")
                expect(err).to_be_visible()
                expect(err).to_contain_text("exit code 7")
                expect(err).to_contain_text("fake-llm log line")
                card("broken").scroll_into_view_if_needed()
                page.screenshot(path=str(SHOTS / "failed.png"))
            check("a failed start shows its error and log tail", failed_start)

            def live_log():
                card("beta").get_by_role("button", name="Show log of beta").click()
                expect(page.locator("#log")).to_contain_text("fake-llm log line 3", timeout=10000)
                chat(url, False)
                expect(page.locator("#requests tbody tr")).to_have_count(4, timeout=10000)
                assert len(navigations) == 1
            check("a model's live log is shown", live_log)

            def phone():
                m = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
                m.add_init_script(f"sessionStorage.setItem('llmvisor-admin-key', '{ADMIN_KEY}')")
                m.goto(url + "/ui/")
                expect(m.locator("#model-beta")).to_be_visible(timeout=10000)
                width = m.evaluate("document.documentElement.scrollWidth")
                assert width <= 390, f"page is {width}px wide on a 390px phone"
                m.screenshot(path=str(SHOTS / "phone.png"))
                m.close()
            check("usable on a phone (no horizontal scroll)", phone)
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
