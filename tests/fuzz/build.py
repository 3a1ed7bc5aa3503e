"""Builds tests/fuzz/abi_fuzz.cpp with the CPU library's sources (csrc/cpu/*.cpp) under
AddressSanitizer + UndefinedBehaviorSanitizer into one executable (cached by content under
build/fuzz/). With clang and libFuzzer available (`clang++ -fsanitize=fuzzer`), build_abi_fuzz(libfuzzer=True)
builds the coverage-guided variant instead."""

from __future__ import annotations

from pathlib import Path

from cuda_emu.build import REPO, compile_and_link

__all__ = ["HERE", "build_abi_fuzz"]

HERE = Path(__file__).resolve().parent
FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-ffp-contract=off", "-fno-trapping-math", "-pthread", "-Wall", "-Wextra",
         "-Wno-unknown-pragmas"]


def build_abi_fuzz(root: Path = REPO, compiler: str = "g++", libfuzzer: bool = False) -> Path:
    """The sanitized fuzz driver of the CPU library under `root` (a tree with csrc/)."""
    includes = [f"-I{root / 'csrc' / d}" for d in ("include", "common", "cpu")]
    headers = sorted(p for d in ("include", "common", "cpu") for p in (root / "csrc" / d).iterdir()
                     if p.suffix in (".h", ".hpp"))
    flags = [*FLAGS, *(["-fsanitize=fuzzer", "-DKBIT_LIBFUZZER"] if libfuzzer else [])]
    units = [*sorted((root / "csrc" / "cpu").glob("*.cpp")), HERE / "abi_fuzz.cpp"]
    return compile_and_link(units, flags=flags, includes=includes, headers=headers, root=root,
                            cache=REPO / "build" / "fuzz", output="abi_fuzz", link=["-pthread", "-lm"],
                            compiler=compiler)
