"""The fuzz campaign's seed corpora replayed deterministically (nox -s fuzz runs the campaign itself):
the Python API harness in this process, the C ABI driver built with the CPU library's sources under
AddressSanitizer + UBSan; and, so that they are evidence, planted bugs each harness must fail on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fuzz import api_harness
from fuzz.build import build_abi_fuzz

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz" / "corpus"
REPO = HERE.parent


def _inputs(kind: str) -> list[Path]:
    files = sorted((CORPUS / kind).iterdir())
    assert len(files) >= 20, f"the {kind} seed corpus is missing"
    return files


def test_api_corpus_replays_clean() -> None:
    for f in _inputs("api"):
        api_harness.one_input(f.read_bytes())


def test_every_api_target_has_seeds() -> None:
    firsts = {f.read_bytes()[0] % len(api_harness.TARGETS) for f in _inputs("api")}
    assert firsts == set(range(len(api_harness.TARGETS)))


def _4bit_seeds() -> list[bytes]:
    return [b for b in (f.read_bytes() for f in _inputs("api")) if api_harness.TARGETS[b[0] % 6] is api_harness.t_4bit]


def test_api_harness_fails_on_an_undocumented_exception(monkeypatch) -> None:
    from kbit import functional as F

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(F, "dequantize_4bit", broken)
    with pytest.raises(RuntimeError, match="planted"):
        for data in _4bit_seeds():
            api_harness.one_input(data)


def test_api_harness_fails_on_a_wrong_result(monkeypatch) -> None:
    from kbit import functional as F

    real = F.dequantize_4bit
    monkeypatch.setattr(F, "dequantize_4bit", lambda packed, state: real(packed, state) * 1.01)
    with pytest.raises(AssertionError, match="dequantize_4bit differs from the format's definition"):
        for data in _4bit_seeds():
            api_harness.one_input(data)


@pytest.fixture(scope="module")
def abi_driver() -> Path:
    if shutil.which("g++") is None:
        pytest.skip("the C ABI fuzz driver is built with g++")
    return build_abi_fuzz()


def _replay(exe: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), "replay", *map(str, _inputs("abi"))], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_abi_corpus_replays_clean(abi_driver: Path, tmp_path: Path) -> None:
    r = _replay(abi_driver, tmp_path)
    assert r.returncode == 0 and "replayed" in r.stdout, r.stderr[-3000:]


# (file under csrc/, code, planted code, what the driver reports)
ABI_PLANTS = {
    "a NULL check removed": ("common/kbit_common.h",
                             "  if (values == NULL || packed == NULL || absmax == NULL) return KBIT_ERR_INVALID_ARGUMENT;",
                             "  if (packed == NULL || absmax == NULL) return KBIT_ERR_INVALID_ARGUMENT;",
                             "null pointer|SEGV"),
    "a refused call that writes": ("cpu/kbit_cpu.cpp",
                                   "  int status = check_blockwise4(dtype, quant_type, A, out, absmax, n, blocksize);\n"
                                   "  if (status != KBIT_OK || n == 0) return status;\n  Quantize4Job job;",
                                   "  int status = check_blockwise4(dtype, quant_type, A, out, absmax, n, blocksize);\n"
                                   "  if (status != KBIT_OK && out != NULL && n > 0 && n < 3000) out[0] = 0;\n"
                                   "  if (status != KBIT_OK || n == 0) return status;\n  Quantize4Job job;",
                                   "a refused call wrote to an output"),
    "a wrong 4-bit value": ("common/kbit_math.h",
                            "{ return codebook[c] * absmax; }", "{ return codebook[c] * absmax * 1.001f; }",
                            "portable path gave other results|round trip error"),
}


@pytest.mark.parametrize("plant", ABI_PLANTS, ids=lambda p: p.replace(" ", "-"))
def test_abi_driver_fails_on_a_planted_bug(plant: str, tmp_path: Path) -> None:
    if shutil.which("g++") is None:
        pytest.skip("the C ABI fuzz driver is built with g++")
    file, old, new, expect = ABI_PLANTS[plant]
    shutil.copytree(REPO / "csrc", tmp_path / "csrc")
    path = tmp_path / "csrc" / file
    text = path.read_text()
    assert text.count(old) == 1, f"{plant}: the code to mutate is no longer in {file}: update the plant"
    path.write_text(text.replace(old, new))
    r = _replay(build_abi_fuzz(root=tmp_path), tmp_path)
    assert r.returncode != 0, f"{plant}: the replay passed"
    assert re.search(expect, r.stderr), r.stderr[-3000:]
