"""Calls of kbit's C ABI as plain data, run through the ctypes bindings of kbit._native on host
buffers: the same call on libkbit_cpu.so and on libkbit_cuda_emu.so, compared byte for byte.

numpy only (no torch), so that a process with AddressSanitizer preloaded can run them:

    python tests/cuda_emu/calls.py LIB CALLS.npz OUT.npz [--schedule N --seed S --grid-cap C]

runs every call of CALLS.npz (written by save_calls) on LIB and writes each call's outputs to OUT.npz.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = ["Arg", "Call", "Emulation", "load_calls", "run_call", "run_call_on_device", "save_calls"]


@dataclass(frozen=True)
class Arg:
    """A buffer argument: the array `name` of the call, passed `offset` bytes into a copy of it (an
    offset of 1 makes an unaligned pointer; the copy is exactly as large as the array, so a kernel
    reading past its end reads past the allocation)."""

    name: str
    offset: int = 0


Scalar = Union[int, float, None]


@dataclass(frozen=True)
class Call:
    """kbit_<entry>(*args) of kbit._native.NativeLibrary; `outputs` are the arrays compared after it
    (written in place, like every kbit entry point's outputs)."""

    id: str
    entry: str
    args: tuple[Union[Arg, Scalar], ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()


def run_call(lib: Any, call: Call) -> dict[str, np.ndarray]:
    """Runs the call on fresh copies of its arrays; returns the output arrays (the views past their
    offsets). Raises what the library's binding raises (KbitNativeError) on a non-zero status."""
    buffers = {name: np.array(a, copy=True, order="C") for name, a in call.arrays.items()}
    argv: list[Any] = []
    for a in call.args:
        if isinstance(a, Arg):
            argv.append(buffers[a.name].ctypes.data + a.offset)
        else:
            argv.append(a)
    getattr(lib, call.entry)(*argv, None)  # stream: none (host memory)
    out = {}
    for name in call.outputs:
        offset = next((a.offset for a in call.args if isinstance(a, Arg) and a.name == name), 0)
        out[name] = buffers[name].view(np.uint8)[offset:]
    return out


def run_call_on_device(lib: Any, call: Call) -> dict[str, np.ndarray]:
    """run_call on a CUDA device: every array copied into its own device buffer of exactly its size
    (with PYTORCH_NO_CUDA_MEMORY_CACHING=1 each is its own cudaMalloc, so compute-sanitizer sees a
    read past it), the call on torch's current stream, the outputs copied back. The same results
    as run_call on the CPU library are what a GPU must give (the rules of test_cuda_emulation.py)."""
    import torch

    buffers = {name: torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).reshape(-1).copy()).cuda()
               for name, a in call.arrays.items()}
    stream = torch.cuda.current_stream().cuda_stream
    argv: list[Any] = []
    for a in call.args:
        argv.append(buffers[a.name].data_ptr() + a.offset if isinstance(a, Arg) else a)
    getattr(lib, call.entry)(*argv, stream)
    torch.cuda.synchronize()
    out = {}
    for name in call.outputs:
        offset = next((a.offset for a in call.args if isinstance(a, Arg) and a.name == name), 0)
        out[name] = buffers[name].cpu().numpy()[offset:]
    return out


class Emulation:
    """The harness's own entry points of libkbit_cuda_emu.so (tests/cuda_emu/runtime.cpp)."""

    IN_ORDER, REVERSED, RANDOM = 0, 1, 2

    def __init__(self, lib: Any) -> None:
        h = lib.handle
        h.kbit_emu_configure.restype = None
        h.kbit_emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int64]
        h.kbit_emu_last_failure.restype = ctypes.c_char_p
        h.kbit_emu_last_failure.argtypes = []
        h.kbit_emu_stats.restype = None
        h.kbit_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
        h.kbit_emu_kernels.restype = ctypes.c_char_p
        h.kbit_emu_kernels.argtypes = []
        self.lib = lib
        self._h = h

    def configure(self, schedule: int, seed: int = 0, grid_cap: int = 0) -> None:
        self._h.kbit_emu_configure(schedule, seed, grid_cap)

    def last_failure(self) -> str:
        return (self._h.kbit_emu_last_failure() or b"").decode(errors="replace")

    def stats(self) -> dict[str, int]:
        v = (ctypes.c_int64 * 5)()
        self._h.kbit_emu_stats(v)
        return dict(zip(("launches", "blocks", "threads", "barriers", "warp_ops"), v))

    def kernels(self) -> dict[str, int]:
        """Every kernel launched since the library was loaded: its name, with template arguments,
        and how many times."""
        return json.loads(self._h.kbit_emu_kernels())


# --- calls as a file (for a subprocess) ----------------------------------------------------------------


def save_calls(path: Path, calls: list[Call]) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, c in enumerate(calls):
        for name, a in c.arrays.items():
            arrays[f"{i}/{name}"] = a
        meta.append({"id": c.id, "entry": c.entry, "outputs": list(c.outputs), "arrays": list(c.arrays),
                     "args": [{"buffer": a.name, "offset": a.offset} if isinstance(a, Arg) else {"value": a}
                              for a in c.args]})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def load_calls(path: Path) -> list[Call]:
    with np.load(path) as f:
        meta = json.loads(f["meta"].tobytes())
        return [Call(m["id"], m["entry"],
                     tuple(Arg(a["buffer"], a["offset"]) if "buffer" in a else a["value"] for a in m["args"]),
                     {name: f[f"{i}/{name}"] for name in m["arrays"]}, tuple(m["outputs"]))
                for i, m in enumerate(meta)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lib", type=Path)
    p.add_argument("calls", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--schedule", type=int, default=Emulation.IN_ORDER)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-cap", type=int, default=0)
    args = p.parse_args(argv)
    from kbit._native import open_library

    lib = open_library(args.lib, None)
    emulation = Emulation(lib) if lib.backend == "cuda-emu" else None
    if emulation is not None:
        emulation.configure(args.schedule, args.seed, args.grid_cap)
    results = {}
    for call in load_calls(args.calls):
        for name, a in run_call(lib, call).items():
            results[f"{call.id}/{name}"] = a
    if emulation is not None:
        results["kernels"] = np.frombuffer(json.dumps(emulation.kernels()).encode(), dtype=np.uint8)
    np.savez(args.out, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
