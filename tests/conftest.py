"""Shared fixtures. The tests import kbit as installed (or from PYTHONPATH in a dev layout made by
tests/dev_layout.sh); they never reach into the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def package_dir() -> Path:
    import kbit

    return Path(kbit.__file__).resolve().parent


@pytest.fixture
def no_native(monkeypatch):
    """Fail the test if a call reaches native code: for the checks that must refuse an argument first."""
    from kbit import _ops

    def refuse(device):
        raise AssertionError(f"reached native code for {device}")

    monkeypatch.setattr(_ops, "_library", refuse)


@pytest.fixture
def fresh_native():
    """The loader's cache, emptied before and after the test."""
    from kbit import _native

    _native._reset_cache()
    yield _native
    _native._reset_cache()


def _run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    full.update(env or {})
    return subprocess.run([sys.executable, *args], env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture
def run_python():
    """Run this interpreter in a fresh process: the environment without KBIT_* plus `env=`."""
    return _run_python
