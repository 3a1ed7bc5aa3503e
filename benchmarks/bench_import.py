"""What kbit adds to a program's start: `import kbit` on top of `import torch`, and the selection work.

    python benchmarks/bench_import.py [--repeat 21] [--json out.json]

Import times are wall times of fresh interpreters (`python -c ...`), median of --repeat runs, the
commands alternated so drift hits all alike; with torch taking seconds on a small machine, their
difference is mostly noise (its interquartile range is printed), so `import kbit` is also timed
inside each fresh interpreter, right after `import torch`: that is the figure held to the target. The selection figures are in-process medians:
`_policy.select` alone (the pure decision), and the probes it needs at first CUDA use (the driver
through libcuda.so.1, the manifest). Targets (issue 3): `import kbit` ≤ 50 ms over `import torch`,
selection ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPORT_TARGET_MS = 50.0
SELECT_TARGET_MS = 5.0

SELECTION = r"""
import json, os, statistics, sys, time
import torch  # already imported by the time a CUDA tensor reaches kbit
from kbit import _native, _policy, _probes

def median_ms(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

t0 = time.perf_counter()
probes = _probes.Probes(_probes.probe_torch(), _probes.probe_driver())
first_probe_ms = (time.perf_counter() - t0) * 1e3
manifest = _probes.probe_manifest(_native.PACKAGE_DIR)
env = dict(os.environ)
decision = _policy.select(probes, manifest, env)
print(json.dumps({
    "select_ms": median_ms(lambda: _policy.select(probes, manifest, env), 200),
    "probe_driver_ms": median_ms(_probes.probe_driver, 20),
    "probe_manifest_ms": median_ms(lambda: _probes.probe_manifest(_native.PACKAGE_DIR), 50),
    "first_probes_ms": first_probe_ms,
    "decision": decision.reason,
}))
"""


def wall_ms(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())
    return (time.perf_counter() - t0) * 1e3


AFTER_TORCH = "import time, torch; t = time.perf_counter(); import kbit; print((time.perf_counter() - t) * 1e3)"


def in_process_ms(code: str) -> float:
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(r.stdout)


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    wall_ms("import torch, kbit")  # warm the file cache
    torch_only, with_kbit, bare, after_torch = [], [], [], []
    for _ in range(args.repeat):
        torch_only.append(wall_ms("import torch"))
        with_kbit.append(wall_ms("import torch, kbit"))
        bare.append(wall_ms("import kbit"))
        after_torch.append(in_process_ms(AFTER_TORCH))
    sel = json.loads(subprocess.run([sys.executable, "-c", SELECTION], check=True, capture_output=True,
                                    text=True).stdout)
    t, k = statistics.median(torch_only), statistics.median(with_kbit)
    figures = {
        "python": sys.version.split()[0],
        "repeat": args.repeat,
        "import_torch_ms": t,
        "import_torch_kbit_ms": k,
        "import_kbit_over_torch_ms": k - t,
        "import_kbit_over_torch_iqr_ms": iqr([b - a for a, b in zip(torch_only, with_kbit)]),
        "import_kbit_after_torch_ms": statistics.median(after_torch),
        "import_kbit_alone_ms": statistics.median(bare),
        **sel,
    }
    rows = [
        ("import torch", t, None),
        ("import torch, kbit", k, None),
        (f"  difference (IQR {figures['import_kbit_over_torch_iqr_ms']:.0f} ms)", k - t, None),
        ("import kbit, after torch, in-process", figures["import_kbit_after_torch_ms"], IMPORT_TARGET_MS),
        ("import kbit (no torch)", figures["import_kbit_alone_ms"], None),
        ("_policy.select (one call)", sel["select_ms"], SELECT_TARGET_MS),
        ("probe_driver (libcuda.so.1)", sel["probe_driver_ms"], None),
        ("probe_manifest", sel["probe_manifest_ms"], None),
        ("first probes (torch + driver)", sel["first_probes_ms"], None),
    ]
    print(f"{'median of ' + str(args.repeat) + ' runs, Python ' + figures['python']:<38} {'ms':>9}  target")
    for name, value, target in rows:
        verdict = "" if target is None else f"≤ {target:g} ms {'ok' if value <= target else 'MISSED'}"
        print(f"{name:<38} {value:>9.3f}  {verdict}")
    print(f"decision here: {sel['decision']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
