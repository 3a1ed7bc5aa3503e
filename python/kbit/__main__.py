"""`python -m kbit [--json]`: what this machine has, what kbit bundles, and which library it uses.

Exit status: 0 when the libraries kbit would use load; 1 when the manifest is missing or corrupt, a
library fails to load, the self-test round trip fails, or an override in the environment is invalid.

`python -m kbit verify` checks every bundled library against the manifest without loading it: 0
when all match, 1 on any mismatch (one line per library either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import fields, is_dataclass
from typing import Any, Optional

from . import __version__, _native
from ._errors import KbitError, KbitLibraryError
from ._probes import Probes, probe_all, probe_manifest
from ._versions import CudaVersion


def _plain(value: Any) -> Any:
    """JSON-ready: CudaVersion and tuples become strings and lists."""
    if isinstance(value, CudaVersion):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# The 8-bit dynamic code's widest gap is about 1/64 of absmax: a round trip off by more is broken.
_SELF_TEST_TOLERANCE = 0.02


def _self_test(probes: Probes, decision: dict[str, Any]) -> list[dict[str, Any]]:
    """One small quantize/dequantize round trip on the CPU, and on GPU 0 when a CUDA library loaded."""
    if not probes.torch.found:
        return [{"device": "cpu", "skipped": f"needs torch ({probes.torch.error})"}]
    devices = ["cpu"]
    if decision.get("loaded"):
        devices.append("cuda")
    results: list[dict[str, Any]] = []
    for device in devices:
        try:
            import torch

            from . import functional as F

            A = torch.linspace(-3.0, 3.0, 4096, device=device)
            codes, state = F.quantize_blockwise(A, blocksize=256)
            B = F.dequantize_blockwise(codes, state)
            scale = state.absmax.repeat_interleave(256)
            err = float(((A - B).abs() / scale).max().item())
        except Exception as e:  # report any failure as the self-test's result, never a traceback
            results.append({"device": device, "error": f"{type(e).__name__}: {e}"})
            continue
        entry: dict[str, Any] = {"device": device, "max_relative_error": err}
        if not err <= _SELF_TEST_TOLERANCE:
            entry["error"] = f"round trip error {err:.4g} > {_SELF_TEST_TOLERANCE} of absmax"
        results.append(entry)
    return results


def report(env: Optional[dict[str, str]] = None, probes: Optional[Probes] = None,
           self_test: bool = False) -> dict[str, Any]:
    env = dict(os.environ) if env is None else env
    probes = probe_all() if probes is None else probes
    manifest = probe_manifest(_native.PACKAGE_DIR)
    out: dict[str, Any] = {
        "kbit": __version__,
        "package_dir": str(_native.PACKAGE_DIR),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": _plain(probes.torch),
        "driver": _plain(probes.driver),
        "manifest": _plain(manifest),
        "overrides": {k: v for k, v in env.items() if k in ("KBIT_BACKEND", "KBIT_CUDA_VERSION", "KBIT_LIBRARY")},
    }
    errors = []
    try:
        cpu = _native._load("cpu", env=env)
        out["cpu_library"] = {"path": cpu.path, "build_info": dict(cpu.build_info)}
    except KbitError as e:
        out["cpu_library"] = {"error": str(e)}
        errors.append(str(e))
    try:
        load = _native._load("cuda", env=env, probes=probes)
        d = load.decision
        out["decision"] = {
            "backend": d.backend, "file": d.file, "exact": d.exact, "override": d.override,
            "reason": load.reason,
            "candidates": [_plain(c) for c in d.candidates],
            "fallbacks": list(d.fallbacks),
            "loaded": None if load.library is None else load.library.path,
            "failures": [{"file": f, "why": w} for f, w in load.failures],
        }
        if d.backend == "cuda" and load.library is None:
            errors.append(load.reason)
    except KbitError as e:
        out["decision"] = {"error": str(e)}
        errors.append(str(e))
    if self_test:
        out["self_test"] = _self_test(probes, out["decision"])
        errors += [f"self-test on {t['device']}: {t['error']}" for t in out["self_test"] if "error" in t]
    out["ok"] = not errors
    out["errors"] = list(dict.fromkeys(errors))  # one manifest problem fails both loads: say it once
    return out


def _text(r: dict[str, Any]) -> str:
    lines = [f"kbit {r['kbit']} ({r['package_dir']})", f"platform   {r['platform']}", f"python     {r['python']}"]
    t = r["torch"]
    if t["found"]:
        build = f"CUDA {t['cuda']}" if t["cuda"] else (f"HIP {t['hip']}" if t["hip"] else "CPU only")
        lines.append(f"torch      {t['version']} ({build}), {t['device_count']} device(s)")
    else:
        lines.append(f"torch      not available ({t['error']})")
    if t["found"] and t["error"]:
        lines.append(f"           note: {t['error']}")
    d = r["driver"]
    if d["found"]:
        branch = d["branch"] if d.get("branch") is not None else "unknown"
        lines.append(f"driver     CUDA {d['version'] or 'unknown'}, branch {branch} ({d['path']})")
    else:
        lines.append(f"driver     none ({d['error']})")
    for dev in d["devices"]:
        cap = dev["capability"]
        lines.append(f"  GPU {dev['index']}    {dev['name']} sm_{cap[0]}{cap[1]}")
    if d["found"] and d["error"]:
        lines.append(f"           note: {d['error']}")
    m = r["manifest"]
    lines.append(f"manifest   {m['path']}" + (f": {m['error']}" if m["error"] else ""))
    if m.get("note"):
        lines.append(f"           note: {m['note']}")
    if m.get("kbit_version") and r["kbit"] != "0+unknown" and m["kbit_version"] != r["kbit"]:
        lines.append(f"           note: written for kbit {m['kbit_version']}, this is kbit {r['kbit']}")
    for lib in m["libraries"]:
        cuda = f"CUDA {lib['cuda']}" if lib["cuda"] else "CPU"
        lines.append(f"  {lib['file']:<22} {cuda:<9} cubin {','.join(lib['archs']) or '-':<28} "
                     f"ptx {','.join(lib['ptx']) or '-'}")
    cpu = r["cpu_library"]
    lines.append(f"CPU        {cpu.get('path') or cpu.get('error')}")
    dec = r["decision"]
    if "error" in dec:
        lines.append(f"CUDA       error: {dec['error']}")
    else:
        for c in dec["candidates"]:
            lines.append(f"  {c['verdict']:<9} {c['file']:<22} {c['why']}")
        for f in dec["failures"]:
            lines.append(f"  failed    {f['file']:<22} {f['why']}")
        lines.append(f"choice     {dec['reason']}")
    for t in r.get("self_test", []):
        result = t.get("error") or t.get("skipped") or f"ok (max error {t['max_relative_error']:.4f} of absmax)"
        lines.append(f"self-test  {t['device']}: {result}")
    lines.append("status     " + ("ok" if r["ok"] else "FAILED: " + " | ".join(r["errors"])))
    return "\n".join(lines)


def _verify() -> int:
    from ._verify import verify

    try:
        abi = frozenset(_native._SIGNATURES)  # from the packaged kbit.h
    except KbitLibraryError as e:
        print(f"FAILED {'kbit.h':<22} {e}")
        print(f"no library checked against {_native.PACKAGE_DIR / 'manifest.json'}")
        return 1
    checks = verify(_native.PACKAGE_DIR, abi)
    for check in checks:
        print(check.line())
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} libraries match {_native.PACKAGE_DIR / 'manifest.json'}")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kbit", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["verify"],
                        help="verify: check every bundled library against the manifest (sha256, ABI "
                             "symbols, cubin/PTX archs); exit 1 on any mismatch")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-self-test", action="store_true",
                        help="skip the quantize/dequantize round trip on the chosen backend(s)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify()
    r = report(self_test=not args.no_self_test)
    print(json.dumps(r, indent=2) if args.json else _text(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
