#!/bin/sh
# Lay out a development copy of the package in python/kbit/ (the outputs are gitignored): build
# libkbit_cpu.so, copy it and kbit.h next to the Python sources and write its manifest.json with the
# build's own manifest writer. Then run the tests from the source tree with:
#     sh tests/dev_layout.sh && PYTHONPATH=python python -m pytest tests
# (Against an installed wheel, skip this and leave PYTHONPATH unset.)
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${KBIT_DEV_BUILD:-/tmp/kb-cpu}
python=${PYTHON:-python3}
cmake -S "$repo" -B "$build" -DKBIT_CUDA=OFF >/dev/null
cmake --build "$build" -j2
lib=$(find "$build" -name libkbit_cpu.so -print -quit)
[ -n "$lib" ] || { echo "dev_layout: no libkbit_cpu.so under $build" >&2; exit 1; }
cp "$lib" "$repo/python/kbit/libkbit_cpu.so"
cp "$repo/csrc/include/kbit.h" "$repo/python/kbit/kbit.h"  # the runtime's ABI table, as the wheel installs it
(cd "$repo" && PYTHONPATH="$repo/python" "$python" -m ci.write_manifest "$repo/python/kbit" 0.1.0)
