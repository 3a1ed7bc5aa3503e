"""The matrix loader (ci/kbit_ci/matrix.py) on matrices written for the test: what it takes from a row,
and the exact refusal of each impossible one. (tests/test_matrix.py checks the real ci/matrix.toml.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from kbit._versions import CudaVersion

from ci.kbit_ci.matrix import MatrixError, load_matrix, select_rows, with_extra_archs

REPO = Path(__file__).resolve().parents[1]


def row(cuda: str = "12.4", archs: str = '["80", "90"]', ptx: str = "90", gcc: str = "[9, 13]",
        dockerfile: str = "docker/debian.Dockerfile", source: str = 'nvidia_image = "nvidia/cuda:x"') -> str:
    return (f'[[row]]\ncuda = "{cuda}"\narchs = {archs}\nptx = "{ptx}"\ngcc = {gcc}\ndockerfile = "{dockerfile}"\n'
            f"{source}\n")


def matrix(tmp_path: Path, *rows: str, schema: str = "schema = 1\n") -> Path:
    path = tmp_path / "matrix.toml"
    path.write_text(schema + "\n".join(rows))
    return path


DEBIAN = '''[row.debian]
suite = "trixie"
base_image = "debian:trixie-slim"
gxx = "g++-13"
extra_suite = "experimental"
packages = { nvidia-cuda-toolkit = "12.5.82~12.5.1-1", nvidia-cuda-dev = "12.5.82~12.5.1-1" }
'''
PYPI = '''[row.pypi]
base_image = "debian:bookworm-slim"
packages = { nvidia-cuda-nvcc = "13.0.88", nvidia-cuda-runtime = "13.0.96", nvidia-cuda-cccl = "13.0.85" }
'''


def test_a_row_is_read_field_by_field(tmp_path: Path) -> None:
    rows = load_matrix(matrix(tmp_path, row("11.8", '["70", "90"]', "90", "[9, 11]"),
                              row("12.5", '["80", "90", "90a", "100f"]', "100f", "[10, 13]", source=DEBIAN),
                              row("13.0", '["75", "120"]', "120", "[11, 15]", "docker/pypi.Dockerfile", PYPI)))
    old, deb, pypi = rows
    assert (old.cuda, old.archs, old.ptx, old.gcc, old.dockerfile, old.nvidia_image, old.debian, old.pypi) == (
        CudaVersion(11, 8), ("70", "90"), "90", (9, 11), "docker/debian.Dockerfile", "nvidia/cuda:x", None, None)
    assert (old.tag, old.id, old.library, old.image) == ("118", "cu118", "libkbit_cuda118.so", "kbit-build:cu118")
    assert old.cmake_archs == "70-real;90-real;90-virtual"
    assert deb.archs == ("80", "90", "90a", "100f") and deb.cmake_archs == "80-real;90-real;90a-real;100f-real;100f-virtual"
    assert deb.nvidia_image is None and deb.pypi is None
    d = deb.debian
    assert (d.suite, d.base_image, d.gxx, d.extra_suite, dict(d.packages), d.toolkit_version) == (
        "trixie", "debian:trixie-slim", "g++-13", "experimental",
        {"nvidia-cuda-toolkit": "12.5.82~12.5.1-1", "nvidia-cuda-dev": "12.5.82~12.5.1-1"}, "12.5.82~12.5.1-1")
    p = pypi.pypi
    assert (p.base_image, p.toolkit_version) == ("debian:bookworm-slim", "13.0.88")
    assert p.requirements() == ["nvidia-cuda-cccl==13.0.85", "nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-runtime==13.0.96"]
    assert pypi.debian is None and pypi.dockerfile == "docker/pypi.Dockerfile"


def test_a_debian_row_without_an_extra_suite(tmp_path: Path) -> None:
    (r,) = load_matrix(matrix(tmp_path, row(source=DEBIAN.replace('extra_suite = "experimental"\n', ""))))
    assert r.debian.extra_suite is None


@pytest.mark.parametrize(("name", "text", "error"), [
    ("schema-2", row(), "{path}: unknown schema 2"),
    ("schema-missing", row(), "{path}: unknown schema None"),
    ("no-rows", "", "{path}: no [[row]]"),
    ("no-archs", row().replace('archs = ["80", "90"]\n', ""), "matrix.toml row 0: KeyError('archs')"),
    ("no-ptx", row().replace('ptx = "90"\n', ""), "matrix.toml row 0: KeyError('ptx')"),
    ("no-dockerfile-key", row().replace('dockerfile = "docker/debian.Dockerfile"\n', ""),
     "matrix.toml row 0: KeyError('dockerfile')"),
    ("cuda-bad", row(cuda="twelve"),
     "matrix.toml row 0: ValueError(\"not a CUDA version: 'twelve' (expected e.g. '12.4' or '124')\")"),
    ("archs-string", row(archs='"80"'), "matrix.toml row 0: TypeError(\"archs must be a list, got '80'\")"),
    ("gcc-string", row(gcc='"913"'), "matrix.toml row 0: TypeError(\"gcc must be a list, got '913'\")"),
    ("gcc-words", row(gcc='["a", "b"]'), "matrix.toml row 0: ValueError(\"invalid literal for int() with base 10: 'a'\")"),
    ("archs-descending", row(archs='["90", "80"]'), "matrix.toml row 0: archs must be unique and ascending: ('90', '80')"),
    ("archs-numeric-order", row(archs='["100", "90"]', ptx="100"),
     "matrix.toml row 0: archs must be unique and ascending: ('100', '90')"),
    ("archs-twice", row(archs='["80", "80"]', ptx="80"), "matrix.toml row 0: archs must be unique and ascending: ('80', '80')"),
    ("suffix-before-plain", row(archs='["90a", "90"]', ptx="90a"),
     "matrix.toml row 0: archs must be unique and ascending: ('90a', '90')"),
    ("ptx-below-top", row(ptx="80"), "matrix.toml row 0: ptx 80 is below the top arch 90"),
    ("arch-typo", row(archs='["80", "90X"]'), "matrix.toml row 0: an arch is written like 90, 90a or 100f, not '90X'"),
    ("arch-prefixed", row(archs='["sm_80"]', ptx="compute_90"),
     "matrix.toml row 0: an arch is written like 90, 90a or 100f, not 'sm_80', 'compute_90'"),
    ("ptx-below-the-last-of-three", row(archs='["80", "90", "100"]', ptx="90"),
     "matrix.toml row 0: ptx 90 is below the top arch 100"),
    ("ptx-plain-below-suffixed", row(archs='["90", "90a"]', ptx="90"), "matrix.toml row 0: ptx 90 is below the top arch 90a"),
    ("gcc-three", row(gcc="[9, 10, 11]"), "matrix.toml row 0: gcc must be [min, max]: (9, 10, 11)"),
    ("gcc-one", row(gcc="[9]"), "matrix.toml row 0: gcc must be [min, max]: (9,)"),
    ("gcc-reversed", row(gcc="[13, 9]"), "matrix.toml row 0: gcc must be [min, max]: (13, 9)"),
    ("no-such-dockerfile", row(dockerfile="docker/nope.Dockerfile"), "matrix.toml row 0: no such dockerfile docker/nope.Dockerfile"),
    ("no-toolkit-source", row(source=""), "matrix.toml row 0: no toolkit source (debian, pypi or nvidia_image)"),
    ("major-without-a-floor", row(cuda="14.0"),
     "matrix.toml row 0: CUDA 14.x has no minor-version compatibility floor in python/kbit/_drivers.py "
     "(MINOR_COMPAT_FLOOR): add the major's first driver branch there"),
    ("second-row", row() + row(cuda="12.5", ptx="80"), "matrix.toml row 1: ptx 80 is below the top arch 90"),
    ("rows-descending", row(cuda="12.5") + row(cuda="12.4"), "{path}: rows must be unique and ascending by cuda: 12.5, 12.4"),
    ("rows-twice", row() + row(), "{path}: rows must be unique and ascending by cuda: 12.4, 12.4"),
])
def test_an_impossible_matrix_is_refused_saying_where(tmp_path: Path, name: str, text: str, error: str) -> None:
    schema = {"schema-2": "schema = 2\n", "schema-missing": ""}.get(name, "schema = 1\n")
    path = matrix(tmp_path, text, schema=schema)
    with pytest.raises(MatrixError) as info:
        load_matrix(path)
    assert str(info.value) == error.format(path=path)
    assert isinstance(info.value, ValueError) and info.value.__cause__ is None


@pytest.mark.parametrize(("archs", "ptx", "gcc"), [('["90", "90a", "100f"]', "100f", "[13, 13]"),
                                                   ('["75", "80"]', "90", "[9, 9]")])
def test_edge_rows_are_accepted(tmp_path: Path, archs: str, ptx: str, gcc: str) -> None:
    (r,) = load_matrix(matrix(tmp_path, row(archs=archs, ptx=ptx, gcc=gcc)))
    assert r.ptx == ptx and r.gcc == tuple(int(x) for x in gcc.strip("[]").split(","))


ROWS = ("11.8", "12.4", "12.5", "13.0")


@pytest.fixture
def rows(tmp_path: Path):
    return load_matrix(matrix(tmp_path, *(row(v) for v in ROWS)))


@pytest.mark.parametrize(("wanted", "picked"), [
    ([], ROWS), (["12.4"], ("12.4",)), (["124", "cu118"], ("12.4", "11.8")), (["13.0", "12.5"], ("13.0", "12.5")),
])
def test_select_rows_in_the_order_asked(rows, wanted: list[str], picked: tuple[str, ...]) -> None:
    assert tuple(str(r.cuda) for r in select_rows(rows, wanted)) == picked


def test_select_rows_refuses_a_version_not_in_the_matrix(rows) -> None:
    with pytest.raises(MatrixError) as info:
        select_rows(rows, ["12.4", "12.6"])
    assert str(info.value) == "CUDA 12.6 is not in ci/matrix.toml (rows: 11.8, 12.4, 12.5, 13.0)"
    with pytest.raises(ValueError, match="not a CUDA version"):
        select_rows(rows, ["twelve"])


def test_with_extra_archs_adds_cubins_in_order(rows) -> None:
    assert with_extra_archs(rows, []) is rows
    out = with_extra_archs(rows, ["61", " SM_120 ", "sm_80"])
    assert [r.archs for r in out] == [("61", "80", "90", "120")] * 4
    assert [r.ptx for r in out] == ["90"] * 4 and [r.cuda for r in out] == [r.cuda for r in rows]


@pytest.mark.parametrize("arch", ["6", "sm_x1", "compute_61", "61a", ""])
def test_with_extra_archs_refuses_what_is_not_a_compute_capability(rows, arch: str) -> None:
    with pytest.raises(MatrixError) as info:
        with_extra_archs(rows, [arch])
    assert str(info.value) == f"--arch {arch!r}: expected a compute capability like 61 or sm_61"
