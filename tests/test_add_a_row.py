"""The "add a CUDA row" recipe of docs/architecture.md, performed on a copy of the matrix: the new row
reaches every consumer (the loader, the CI workflow, the hash-lock check, the runtime's policy) with
no other edit, and each step the recipe names is the one that fails while it is skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kbit._manifest import LibraryEntry, Manifest
from kbit._policy import select
from kbit._probes import Device, DriverProbe, Probes, TorchProbe
from kbit._versions import CudaVersion

from ci import workflow
from ci.kbit_ci import matrix as matrix_module
from ci.kbit_ci.locks import lock_mismatches, pypi_lock_path, render_lock
from ci.kbit_ci.matrix import MATRIX_FILE, MatrixError, load_matrix

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"

NEW_ROW = """
[[row]]
cuda = "{cuda}"
archs = ["75", "80", "86", "89", "90", "100", "120"]
ptx = "120"
gcc = [9, 15]
dockerfile = "docker/pypi.Dockerfile"
[row.pypi]
base_image = "debian:bookworm-slim"
packages = {{ nvidia-cuda-nvcc = "{cuda}.10", nvidia-nvvm = "{cuda}.10", nvidia-cuda-crt = "{cuda}.10", nvidia-cuda-runtime = "{cuda}.11", nvidia-cuda-cccl = "{cuda}.12" }}
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what the recipe edits: the matrix and the hash locks."""
    (tmp_path / "ci").mkdir()
    shutil.copy2(MATRIX_FILE, tmp_path / "ci" / "matrix.toml")
    shutil.copytree(REPO / "ci" / "requirements", tmp_path / "ci" / "requirements")
    return tmp_path


def add_row(tree: Path, cuda: str) -> Path:
    path = tree / "ci" / "matrix.toml"
    path.write_text(path.read_text() + NEW_ROW.format(cuda=cuda))
    return path


def test_the_recipe_is_the_documented_one() -> None:
    text = DOC.read_text()
    for step in ("[[row]]", "python -m ci.lock_pypi", "python/kbit/_drivers.py", "python -m ci.workflow",
                 "tests/test_add_a_row.py"):
        assert step in text, f"docs/architecture.md's recipe no longer names {step}"


def test_a_new_row_reaches_every_consumer(tree: Path) -> None:
    rows = load_matrix(add_row(tree, "13.6"))  # step 1
    new = rows[-1]
    assert (new.cuda, new.id, new.library) == (CudaVersion(13, 6), "cu136", "libkbit_cuda136.so")

    # Step 2: the row's hash lock. Until it is written the check names it; then it passes.
    assert lock_mismatches(rows, tree) == [f"CUDA 13.6: no hash lock {pypi_lock_path(new, tree)} for its PyPI pins"]
    digests = {name: ["ab" * 32] for name in ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt",
                                              "nvidia-cuda-runtime", "nvidia-cuda-cccl")}
    pypi_lock_path(new, tree).write_text(render_lock(new, digests))
    assert lock_mismatches(rows, tree) == []

    # Step 4: the workflow generator gives the row its job.
    assert {"cuda": "13.6", "id": "cu136", "library": "libkbit_cuda136.so"} in workflow.matrix_include(rows)
    assert workflow.render(workflow.workflow(rows)) != workflow.render(workflow.workflow(rows[:-1]))

    # The runtime needs no edit: the manifest names the library, the policy judges it.
    lib = LibraryEntry(new.library, "cuda", new.cuda, new.archs, (new.ptx,))
    probes = Probes(TorchProbe(True, "2.13.0", CudaVersion(13, 6)),
                    DriverProbe(True, "libcuda.so.1", CudaVersion(13, 6), (Device(0, "GPU0", (12, 0)),)))
    d = select(probes, Manifest("m.json", (lib,)), {})
    assert (d.backend, d.file, d.exact) == ("cuda", "libkbit_cuda136.so", True)
    # Without its oldest driver branch in kbit._drivers.MIN_DRIVER (step 3's optional half), the fix
    # names the CUDA version instead of a branch.
    older = Probes(probes.torch, DriverProbe(True, "libcuda.so.1", CudaVersion(13, 0), probes.driver.devices))
    assert "(needs a driver for CUDA ≥ 13.6)" in select(older, Manifest("m.json", (lib,)), {}).candidates[0].why


def test_a_new_major_needs_its_floor_first(tree: Path, monkeypatch) -> None:
    path = add_row(tree, "14.0")
    with pytest.raises(MatrixError, match=r"CUDA 14\.x has no minor-version compatibility floor in python/kbit/_drivers\.py"):
        load_matrix(path)  # step 3 skipped
    monkeypatch.setattr(matrix_module, "MINOR_COMPAT_FLOOR", {**matrix_module.MINOR_COMPAT_FLOOR, 14: 600})
    assert load_matrix(path)[-1].cuda == CudaVersion(14, 0)
