"""The CI workflow is generated from ci/matrix.toml: the checked-in file is the generator's output,
and its per-row build jobs are exactly the matrix rows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ci import workflow as wf
from ci.kbit_ci.matrix import load_matrix

REPO = Path(__file__).resolve().parents[1]


ROWS = load_matrix()


def _yaml():
    return pytest.importorskip("yaml")  # the test session installs pyyaml


@pytest.fixture(scope="module")
def checked_in() -> dict:
    return _yaml().safe_load(wf.WORKFLOW_FILE.read_text())


def test_checked_in_workflow_is_the_generators_output():
    assert wf.WORKFLOW_FILE == REPO / ".github" / "workflows" / "build.yml"
    assert wf.WORKFLOW_FILE.read_text() == wf.render(wf.workflow(ROWS)), "run `python -m ci.workflow`"


def test_check_mode_catches_a_stale_file(tmp_path):
    stale = tmp_path / "build.yml"
    stale.write_text(wf.WORKFLOW_FILE.read_text().replace('cuda: "12.4"', 'cuda: "12.7"'))
    cmd = [sys.executable, "-m", "ci.workflow", "--check", "--output", str(stale)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "is stale" in out.stderr and '-          - cuda: "12.7"' in out.stderr
    ok = subprocess.run([*cmd[:-1], str(wf.WORKFLOW_FILE)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr


def test_build_jobs_are_the_matrix_rows(checked_in):
    include = checked_in["jobs"]["library"]["strategy"]["matrix"]["include"]
    assert [e["cuda"] for e in include] == [str(r.cuda) for r in ROWS]
    assert [e["id"] for e in include] == [r.id for r in ROWS]
    assert [e["library"] for e in include] == [r.library for r in ROWS]
    steps = checked_in["jobs"]["library"]["steps"]
    build = next(s for s in steps if "run" in s and "nox -s build" in s["run"])
    assert build["run"] == 'nox -s build -- --cuda "$CUDA" --library-only'
    assert build["env"] == {"CUDA": "${{ matrix.cuda }}"}  # through env, never spliced into the script
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["name"] == "library-${{ matrix.id }}"
    assert "build/stage/libkbit_cuda*.json" in upload["with"]["path"]


def test_renderer_is_faithful(checked_in):
    """What the YAML means is the generator's data, key for key (the "on" key quoted for YAML 1.1)."""
    assert checked_in == wf.workflow(ROWS)


def test_the_fan_in_builds_from_the_staged_libraries_and_tests(checked_in):
    wheels = checked_in["jobs"]["wheels"]
    assert wheels["needs"] == ["library"]
    runs = [s.get("run", "") for s in wheels["steps"]]
    assert "nox -s build -- --staged" in runs and "nox -s tests" in runs
    download = next(s for s in wheels["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    assert download["with"] == {"pattern": "library-*", "merge-multiple": True, "path": "build/stage"}


def test_publish_is_trusted_publishing_on_tags_only(checked_in):
    publish = checked_in["jobs"]["publish"]
    assert publish["permissions"] == {"id-token": "write"}
    assert "refs/tags/v" in publish["if"]
    assert any(s.get("uses", "").startswith("pypa/gh-action-pypi-publish@") for s in publish["steps"])
    assert not any("password" in (s.get("with") or {}) for s in publish["steps"])


def test_hardening(checked_in):
    text = wf.WORKFLOW_FILE.read_text()
    assert checked_in["permissions"] == {}
    for name, job in checked_in["jobs"].items():
        assert "permissions" in job, name
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False
            assert "${{" not in step.get("run", ""), f"{name}: expression spliced into a script"
    for ref in re.findall(r"uses: (\S+)  # (\S+)", text):
        assert ref[0] in {str(a) for a in wf.ACTIONS.values()}


def test_pins_must_be_full_shas():
    with pytest.raises(ValueError, match="full commit SHA"):
        wf.Pinned("actions/checkout@v4", "v4")


@pytest.mark.parametrize("value, rendered", [
    ("3.11", '"3.11"'), ("on", '"on"'), ("${{ matrix.cuda }}", '"${{ matrix.cuda }}"'), ("v*", "v*"),
    ("a: b", '"a: b"'), ("plain text", "plain text"), (True, "true"), (7, "7"), ("x #y", '"x #y"'),
])
def test_scalars(value, rendered):
    assert wf._scalar(value) == rendered
    assert _yaml().safe_load(f"k: {rendered}")["k"] == value
