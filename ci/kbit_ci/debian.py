"""Debian's archive as the tooling uses it: the host's mirror, private apt sources, apt-get download.

    host_debian_mirror()          the Debian mirror this machine's apt already uses
    parse_debian_mirror(files)    the same, from apt sources files' text (pure)
    debian_sources_list(...)      a private sources.list naming Debian's keyring (signed-by)
    apt_download(...)             .debs fetched under a private apt configuration (no root, nothing on
                                  the system changes; apt checks the signed Release files)

Used by the host toolkit providers (kbit_ci.toolkits: Debian's CUDA packages, the g++ nvcc 11.8
needs) and by the base-image bootstrap (kbit_ci.base_images: debootstrap from the same mirror).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import proc
from .errors import ToolkitUnavailable

__all__ = ["DEBIAN_KEYRING", "apt_download", "debian_sources_list", "host_debian_mirror", "parse_debian_mirror"]

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_DEBIAN_SUITES = ("buster", "bullseye", "bookworm", "trixie", "forky", "sid", "unstable", "testing", "stable")
# Suites with a short Valid-Until, served expired by snapshot mirrors: the Release date is not checked.
_UNDATED_SUITES = ("sid", "unstable", "experimental")


def parse_debian_mirror(sources: Mapping[str, str]) -> str | None:
    """The URI of Debian's main archive from apt sources files {path: text}.

    Reads deb822 `.sources` stanzas (`URIs:`) and one-line `deb URI SUITE ...` entries; skips the
    security archive, the `-updates`/`-backports` suites' own hosts are the same so they count.
    """
    for path, text in sorted(sources.items()):
        found = _deb822_mirror(text) if path.endswith(".sources") else _one_line_mirror(text)
        if found is not None:
            return found
    return None


def _deb822_mirror(text: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            if _is_main_debian(uri, suites):
                return uri.rstrip("/")
    return None


def _one_line_mirror(text: str) -> str | None:
    for line in text.splitlines():
        parts = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(parts) >= 3 and parts[0] == "deb" and _is_main_debian(parts[1], [parts[2]]):
            return parts[1].rstrip("/")
    return None


def _is_main_debian(uri: str, suites: Sequence[str]) -> bool:
    if "security" in uri:
        return False
    return any(s.split("-")[0] in _DEBIAN_SUITES for s in suites) and "/debian" in uri


def host_debian_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses."""
    files: dict[str, str] = {}
    candidates = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for p in candidates:
        if p.is_file() and (p.suffix in (".sources", ".list") or p.name == "sources.list"):
            files[str(p)] = p.read_text(errors="replace")
    mirror = parse_debian_mirror(files)
    if mirror is None:
        raise ToolkitUnavailable(f"no Debian archive in {etc_apt}/sources.list[.d]: cannot bootstrap base images")
    return mirror


def debian_sources_list(
    mirror: str, suites: Sequence[str], keyring: str = DEBIAN_KEYRING, undated: Sequence[str] = ()
) -> str:
    """A private sources.list: the mirror's main + contrib + non-free for each suite.

    Suites in `undated` (experimental: short Valid-Until, served expired by snapshot mirrors) skip the
    Release date check; signatures are still verified.
    """
    def opts(suite: str) -> str:
        return f"signed-by={keyring}" + (" check-valid-until=no" if suite in undated else "")

    return "".join(f"deb [{opts(s)}] {mirror} {s} main contrib non-free\n" for s in suites)


def _apt_options(base: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={base / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::Cache={base / 'cache'}",
        "-o", "Dir::State::status=/dev/null",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Get::List-Cleanup=0",
    ]


def apt_download(cache: Path, suites: Sequence[str], wanted: Sequence[str], debs: Path,
                 target: str) -> list[Path]:
    """apt-get download `wanted` (NAME or NAME=VERSION) from the host's Debian mirror's `suites`, with a
    private apt configuration under cache/apt (signed Release files checked); the .debs in `debs`."""
    apt = cache / "apt" / "-".join(suites)
    for p in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial", debs):
        p.mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(debian_sources_list(
        host_debian_mirror(), list(suites), undated=[s for s in suites if s in _UNDATED_SUITES]))
    opts = _apt_options(apt)
    proc.run(["apt-get", *opts, "update", "-q"])
    proc.run(["apt-get", *opts, "-t", target, "download", *wanted], cwd=debs)
    return sorted(debs.glob("*.deb"))
