"""The chat app's real path: the official `openai` client talking to a real llama-server through
the URL ensure_server_running returns. Needs LLAMA_SERVER and LLAMA_MODEL (scripts/test.sh sets
them from scripts/setup-llama.sh); skipped only when they are unset outside CI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import llmvisor
from helpers import alive


def llama_env():
    server, model = os.environ.get("LLAMA_SERVER"), os.environ.get("LLAMA_MODEL")
    if not server or not model:
        if os.environ.get("CI"):
            pytest.fail("LLAMA_SERVER/LLAMA_MODEL not set, but CI is: run scripts/test.sh")
        pytest.skip("LLAMA_SERVER/LLAMA_MODEL not set: run scripts/test.sh (or scripts/setup-llama.sh)")
    assert Path(server).is_file(), f"LLAMA_SERVER={server} is not a file"
    assert Path(model).is_file(), f"LLAMA_MODEL={model} is not a file"
    return server, model


def test_openai_client_answers_through_ensure_server_running_on_llama_server(scratch):
    server, model = llama_env()
    try:
        import openai
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the openai package is missing from the test venv (scripts/test.sh installs it)")
        pytest.skip("the openai package is not installed (scripts/test.sh installs it)")
    cmd = [server, "-m", model, "--host", "127.0.0.1", "--port", "${PORT}",
           "-c", "1024", "-t", "1", "-np", "1"]
    config = (
        f'state_dir = "{scratch.state_dir}"\nport_range = [{scratch.ports[0]}, {scratch.ports[1]}]\n'
        f'[models."gemma-3-270m"]\ncmd = {json.dumps(cmd)}\naliases = ["gemma"]\n'
        f'startup_timeout = "120s"\n'
    )
    lines = []
    with llmvisor.Supervisor(config_text=config) as sup:
        url = sup.ensure_server_running("gemma", log_callback=lines.append, timeout=180)
        [status] = sup.status()
        pid = status["pid"]
        assert status["state"] == "ready" and status["url"] == url
        assert lines, "log_callback got none of llama-server's output"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="gemma",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content is not None
        assert reply.usage.completion_tokens >= 1
        # A second ensure, by id this time, reuses the same server.
        assert sup.ensure_server_running("gemma-3-270m") == url
    # Leaving the block closed the supervisor: the server is stopped (and reaped) by then.
    assert not alive(pid), "llama-server outlived close()"
