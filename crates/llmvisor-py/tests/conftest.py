"""Fixtures: configs for the fake server (crates/fake-llm), and process bookkeeping so that every
test proves it left no server behind (and kills, by pid, whatever a failing test leaked)."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # helpers.py, for the multiprocessing workers

from helpers import alive, pids_in, wait_gone  # noqa: E402

WORKSPACE = HERE.parent.parent.parent


def fake_llm_path() -> Path:
    env = os.environ.get("FAKE_LLM_BIN")
    if env:
        return Path(env)
    for profile in ("debug", "release"):
        p = WORKSPACE / "target" / profile / "fake-llm"
        if p.exists():
            return p
    pytest.exit("fake-llm is not built: run `cargo build -p fake-llm` (scripts/test.sh does)", 2)


_slots = itertools.count()


class Scratch:
    """One test's directory: a state dir, pid files the fake servers append to, and its own
    slice of ports (so that spawn counts are not disturbed by another test's servers)."""

    def __init__(self, root: Path):
        self.root = root
        self.state_dir = root / "state"
        base = 32000 + (os.getpid() % 20) * 1000 + (next(_slots) % 20) * 50
        self.ports = (base, base + 49)
        self.fake_llm = fake_llm_path()

    def pid_file(self, model: str) -> Path:
        return self.root / f"{model}.pids"

    def pids(self, model: str) -> list[int]:
        return pids_in(self.pid_file(model))

    def all_pids(self) -> list[int]:
        out = []
        for p in self.root.glob("*.pids"):
            out.extend(pids_in(p))
        return out

    def config_text(self, models: dict[str, str], extra: str = "", model_extra: str = "") -> str:
        """One fake-llm model per `id -> extra fake-llm flags`."""
        text = (
            f'state_dir = "{self.state_dir}"\nport_range = [{self.ports[0]}, {self.ports[1]}]\n'
            f'{extra}\n[defaults]\nstartup_timeout = "30s"\nstop_timeout = "2s"\n'
        )
        for model, flags in models.items():
            text += (
                f"[models.{model}]\n"
                f'cmd = "{self.fake_llm} --port ${{PORT}} --pid-file {self.pid_file(model)} {flags}"\n'
                f"{model_extra}\n"
            )
        return text

    def write_config(self, models: dict[str, str], extra: str = "", model_extra: str = "") -> Path:
        path = self.root / "llmvisor.toml"
        path.write_text(self.config_text(models, extra, model_extra))
        return path


@pytest.fixture
def scratch(tmp_path):
    s = Scratch(tmp_path)
    yield s
    leaked = [p for p in s.all_pids() if alive(p)]
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leaked, f"servers left running after the test: {leaked}"


@pytest.fixture
def sup_factory(scratch):
    """Makes Supervisors on the scratch's config and closes them after the test, then checks
    that every server they started is gone."""
    import llmvisor

    made = []

    def make(models: dict[str, str], extra: str = "", model_extra: str = ""):
        sup = llmvisor.Supervisor(config_text=scratch.config_text(models, extra, model_extra))
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.close()
    wait_gone(scratch.all_pids(), 5.0)


def now() -> float:
    return time.monotonic()
