"""NVIDIA driver facts, said once: the oldest Linux driver branch of each CUDA toolkit, and the
branch from which each major's minor-version compatibility holds.

The runtime's policy reads them to judge a library and to name the driver update that fixes a
refusal; the build's matrix loader (ci/kbit_ci/matrix.py) refuses a matrix row whose CUDA version has
no entry here, so a new row cannot ship without the floor its users will be told to reach. Standard
library only, like _versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ._versions import CudaVersion

__all__ = ["MINOR_COMPAT_FLOOR", "MIN_DRIVER"]

# The oldest Linux driver branch shipped with each CUDA toolkit (NVIDIA's CUDA release notes, table
# "CUDA Toolkit and Corresponding Driver Versions"): what "update the driver" must reach.
MIN_DRIVER: Mapping[CudaVersion, int] = MappingProxyType({
    CudaVersion(11, 8): 520,
    CudaVersion(12, 0): 525,
    CudaVersion(12, 1): 530,
    CudaVersion(12, 2): 535,
    CudaVersion(12, 3): 545,
    CudaVersion(12, 4): 550,
    CudaVersion(12, 5): 555,
    CudaVersion(12, 6): 560,
    CudaVersion(12, 8): 570,
    CudaVersion(12, 9): 575,
    CudaVersion(13, 0): 580,
    CudaVersion(13, 1): 590,
})

# Minor-version compatibility: a library built with CUDA X.Y runs on an older driver of major X from
# this branch on, if it needs no JIT (every device has a cubin). The floors are the first branch of
# each major, but the policy checks the branch the probe read and never assumes it.
MINOR_COMPAT_FLOOR: Mapping[int, int] = MappingProxyType({11: 450, 12: 525, 13: 580})
