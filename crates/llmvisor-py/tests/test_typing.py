"""The stubs match the module (mypy's stubtest) and type-check the documented API (mypy
--strict on tests/typed_use.py). mypy comes with the test venv (scripts/test.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def mypy_available() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mypy is missing from the test venv (scripts/test.sh installs it)")
        pytest.skip("mypy is not installed (scripts/test.sh installs it)")


def test_the_stubs_match_the_module(tmp_path):
    mypy_available()
    # From an empty directory, so that the installed package is checked, not the source tree.
    run = subprocess.run([sys.executable, "-m", "mypy.stubtest", "llmvisor"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_documented_api_type_checks(tmp_path):
    mypy_available()
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(HERE / "typed_use.py")],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
