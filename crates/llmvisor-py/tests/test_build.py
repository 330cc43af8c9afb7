"""The package embeds the supervisor library only: none of the daemon's HTTP server or CLI."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import WORKSPACE

DAEMON_ONLY = ("axum", "clap", "anyhow", "tracing-subscriber", "subtle")


def test_the_extension_does_not_depend_on_the_daemon_or_the_cli():
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not on PATH")
    tree = subprocess.run(
        [cargo, "tree", "--offline", "-p", "llmvisor-py", "-e", "normal", "--prefix", "none"],
        cwd=WORKSPACE, capture_output=True, text=True, check=True,
    ).stdout
    crates = {line.split()[0] for line in tree.splitlines() if line.strip()}
    assert "llmvisor" in crates and "pyo3" in crates
    assert not crates & set(DAEMON_ONLY), sorted(crates & set(DAEMON_ONLY))


def test_the_package_ships_stubs_and_py_typed():
    import llmvisor
    from pathlib import Path

    root = Path(llmvisor.__file__).parent
    assert (root / "py.typed").exists()
    assert (root / "__init__.pyi").exists()
