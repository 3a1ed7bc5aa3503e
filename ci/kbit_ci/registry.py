"""Image registries: an image's fully qualified name, the host that serves it, whether it answers.

    upstream_image_ref("debian:bookworm-slim")  -> "docker.io/library/debian:bookworm-slim"
    registry_host(image)                        -> "registry-1.docker.io"
    registry_reachable(host)                    -> bool (any HTTP answer counts; cached per process)
"""

from __future__ import annotations

import functools
import urllib.error
import urllib.request

from . import proc

__all__ = ["registry_host", "registry_reachable", "upstream_image_ref"]

_PROBE_TIMEOUT_S = 5.0


def upstream_image_ref(image: str) -> str:
    """The fully qualified name of an image on Docker Hub: debian:bookworm-slim -> docker.io/library/..."""
    name = image
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return name


def registry_host(image: str) -> str:
    """The registry endpoint that serves `image` (Docker Hub's is registry-1.docker.io)."""
    host = upstream_image_ref(image).split("/", 1)[0]
    return "registry-1.docker.io" if host == "docker.io" else host


@functools.cache
def registry_reachable(host: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether an image registry answers at all (any HTTP status counts). Cached per process."""
    try:
        urllib.request.urlopen(f"https://{host}/v2/", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # 401 Unauthorized is the normal answer of /v2/
    except (urllib.error.URLError, OSError, ValueError) as e:
        proc.log(f"registry {host} does not answer ({getattr(e, 'reason', e)})")
        return False
    return True
