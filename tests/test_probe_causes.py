"""Probes that cannot find something out say why: the cause of every exception they catch is kept
in what they return (import and the probes never raise)."""

from __future__ import annotations

import importlib.metadata
import sys

import kbit
import pytest
from kbit import _probes


def test_broken_metadata_leaves_the_version_unknown_and_says_why(monkeypatch):
    def broken(name):
        raise RuntimeError("METADATA is truncated")

    monkeypatch.setitem(sys.modules, "kbit._version", None)  # as in a source checkout: no frozen version
    monkeypatch.setattr(importlib.metadata, "version", broken)
    with pytest.warns(kbit.KbitWarning, match=r"RuntimeError: METADATA is truncated"):
        assert kbit._version() == "0+unknown"


class _OldDriver:
    """A libcuda whose cuGetErrorName is missing (ctypes raises AttributeError for it)."""

    def __getattr__(self, name):
        raise AttributeError(f"undefined symbol: {name}")


def test_an_unnamed_driver_error_keeps_its_number_and_why_it_has_no_name():
    text = _probes._cu_error(_OldDriver(), 100)
    assert text.startswith("CUresult 100") and "AttributeError: undefined symbol: cuGetErrorName" in text


def test_an_unreadable_driver_branch_is_unknown_with_its_cause(monkeypatch):
    class Lib:
        pass

    monkeypatch.setattr(_probes.ctypes, "CDLL", lambda path: Lib())
    monkeypatch.setattr(_probes, "_query_driver", lambda lib, path: _probes.DriverProbe(True, path))

    def odd_proc():
        raise UnicodeError("garbled /proc/self/maps")

    monkeypatch.setattr(_probes, "driver_branch", odd_proc)
    probe = _probes.probe_driver(("libcuda.so.1",))
    assert probe.found and probe.branch is None
    assert probe.branch_error == "driver branch: UnicodeError: garbled /proc/self/maps"
