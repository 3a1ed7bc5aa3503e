"""`python -m kbit` ends with a quantize/dequantize round trip on the chosen backend(s)."""

from __future__ import annotations

import json


def test_self_test_runs_on_the_cpu(run_python) -> None:
    r = run_python("-m", "kbit", "--json")
    report = json.loads(r.stdout)
    cpu = next(t for t in report["self_test"] if t["device"] == "cpu")
    assert "error" not in cpu and 0 < cpu["max_relative_error"] <= 0.02, cpu
    assert r.returncode == 0 and report["ok"] is True, report["errors"]


def test_self_test_in_the_text_report(run_python) -> None:
    r = run_python("-m", "kbit")
    assert "self-test  cpu: ok (max error 0.00" in r.stdout, r.stdout


def test_self_test_can_be_skipped(run_python) -> None:
    r = run_python("-m", "kbit", "--json", "--no-self-test")
    assert "self_test" not in json.loads(r.stdout)
