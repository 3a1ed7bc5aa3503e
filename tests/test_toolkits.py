"""The pure decisions of the build tooling: engine flags, image pins, apt sources, compilers, CMake args."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from kbit._versions import CudaVersion

from ci.kbit_ci import base_images, debian, engine, images, locks, registry, toolkits
from ci.kbit_ci.build_row import build_dir, c_compiler_for, cmake_args, container_kind
from ci.kbit_ci.errors import ToolkitUnavailable
from ci.kbit_ci.matrix import load_matrix, select_rows

REPO = Path(__file__).resolve().parents[1]


ROWS = load_matrix()
(CU118, CU120, CU124, CU125, CU130) = select_rows(ROWS, ["11.8", "12.0", "12.4", "12.5", "13.0"])


# ---------------------------------------------------------------- engine flags


@pytest.mark.parametrize(
    ("name", "runc", "nofile", "nproc", "want_global", "want_run"),
    [
        ("podman", "/usr/sbin/runc", 20000, 96365, ("--runtime", "/usr/sbin/runc"),
         ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")),
        ("podman", None, None, None, (),
         ("--ulimit", "nofile=1048576:1048576", "--ulimit", "nproc=32768:32768")),
        ("podman", "/bin/runc", 4096, 1024, ("--runtime", "/bin/runc"),
         ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1024:1024")),
        ("docker", "/usr/sbin/runc", 20000, 100, (), ()),
    ],
)
def test_engine_flags(name, runc, nofile, nproc, want_global, want_run):
    g, run, build = engine.engine_flags(name, runc=runc, hard_nofile=nofile, hard_nproc=nproc)
    assert g == want_global
    assert run == want_run
    if name == "podman":
        assert build == (*want_run, "--network", "host")
    else:
        assert build == ()


def test_engine_cmd_puts_global_flags_before_the_subcommand():
    e = engine.Engine("podman", "/usr/bin/podman", global_flags=("--runtime", "/r"))
    assert e.cmd("build", "-t", "x") == ["/usr/bin/podman", "--runtime", "/r", "build", "-t", "x"]


# ---------------------------------------------------------------- mirrors and images

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({"/etc/apt/sources.list.d/debian.sources": DEB822}, "http://mirror.example/debian"),
        ({"/etc/apt/sources.list": "deb http://m.example/debian/ trixie main\n"}, "http://m.example/debian"),
        ({"/etc/apt/sources.list": "deb [signed-by=/k.gpg] http://m.example/debian trixie main\n"},
         "http://m.example/debian"),
        ({"/etc/apt/sources.list": "deb http://m.example/debian-security bookworm-security main\n"
                                   "# deb http://old.example/debian bookworm main\n"}, None),
        ({"/etc/apt/sources.list.d/node.sources":
          "Types: deb\nURIs: https://node.example/node_20.x\nSuites: nodistro\nComponents: main\n"}, None),
        ({"/etc/apt/sources.list.d/a.sources": DEB822.replace("Types: deb\n# http", "Enabled: no\nTypes: deb\n# http", 1)},
         None),
    ],
)
def test_parse_debian_mirror(files, want):
    assert debian.parse_debian_mirror(files) == want


@pytest.mark.parametrize(
    ("image", "ref", "host"),
    [
        ("debian:bookworm-slim", "docker.io/library/debian:bookworm-slim", "registry-1.docker.io"),
        ("nvidia/cuda:12.6.3-devel-ubuntu22.04", "docker.io/nvidia/cuda:12.6.3-devel-ubuntu22.04",
         "registry-1.docker.io"),
        ("nvcr.io/nvidia/cuda:13.0.2-devel", "nvcr.io/nvidia/cuda:13.0.2-devel", "nvcr.io"),
    ],
)
def test_upstream_image_ref(image, ref, host):
    assert registry.upstream_image_ref(image) == ref
    assert registry.registry_host(image) == host


def test_base_images():
    assert base_images.base_image_for(CU118) == ("debian:bookworm-slim", "bookworm")
    assert base_images.base_image_for(CU124) == ("debian:trixie-slim", "trixie")
    assert base_images.base_image_for(CU130) == ("debian:bookworm-slim", "bookworm")
    with pytest.raises(ToolkitUnavailable):
        base_images.base_image_for(CU120)


def test_build_args_are_the_rows_pins():
    a = images.image_build_args(CU125)
    assert a["BASE"] == f"debian:{CU125.debian.suite}-slim" and a["SUITE"] == CU125.debian.suite
    assert a["EXTRA_SUITE"] == "experimental"
    assert a["GXX"] == "g++-13"
    assert "nvidia-cuda-toolkit=12.5.40~12.5.0-2+b1" in a["PACKAGES"].split()
    assert images.image_build_args(CU124)["EXTRA_SUITE"] == ""
    p = images.image_build_args(CU130)
    assert p["REQUIREMENTS"].split() == CU130.pypi.requirements()
    assert images.image_build_args(CU120) == {"NVIDIA_IMAGE": CU120.nvidia_image}


@pytest.mark.parametrize("row", [r for r in ROWS if r.debian or r.pypi], ids=lambda r: r.id)
def test_build_args_of_every_buildable_row(row):
    args = images.image_build_args(row)
    assert all(isinstance(v, str) for v in args.values())
    gxx = images.container_host_compiler(row)
    if row.debian:
        assert int(gxx.removeprefix("g++-")) in range(row.gcc[0], row.gcc[1] + 1)


def test_fingerprint_changes_with_a_pin_and_only_then():
    text = (REPO / CU124.dockerfile).read_text()
    args = images.image_build_args(CU124)
    fp = images.image_fingerprint(text, args)
    assert fp == images.image_fingerprint(text, dict(reversed(list(args.items()))))
    assert fp != images.image_fingerprint(text, {**args, "PACKAGES": args["PACKAGES"] + "x"})
    assert fp != images.image_fingerprint(text + "\n", args)


def test_compile_command():
    e = engine.Engine("podman", "podman", global_flags=("--runtime", "/r"), run_flags=("--ulimit", "a"))
    argv = images.compile_command(e, "kbit-build:cu124", src=Path("/repo"), build=Path("/repo/build/cuda/cu124"),
                                      cmake_args=["-DX=1"], jobs=2, user="1000:1000")
    assert argv[:4] == ["podman", "--runtime", "/r", "run"]
    assert "/repo:/src:ro" in argv and "/repo/build/cuda/cu124:/build" in argv
    assert argv[argv.index("--network") + 1] == "none"
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert argv[-1] == "-DX=1" and "kbit-build:cu124" in argv
    assert "--user" not in images.compile_command(e, "i", src=Path("/s"), build=Path("/b"), cmake_args=[],
                                                      jobs=2, user=None)


def test_install_commands():
    cmds = engine.install_engine_commands()
    assert cmds[0] == ["apt-get", "update"]
    assert {"podman", "runc", "debootstrap"} <= set(cmds[1])


# ---------------------------------------------------------------- toolkits


def test_parse_nvcc_version():
    out = ("nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
           "Built on Wed_Aug_20_01:58:59_PM_PDT_2025\nCuda compilation tools, release 13.0, V13.0.88\n"
           "Build cuda_13.0.r13.0/compiler.36424714_0\n")
    assert toolkits.parse_nvcc_version(out) == (
        CudaVersion(13, 0), "13.0.88", "Cuda compilation tools, release 13.0, V13.0.88")
    with pytest.raises(ValueError):
        toolkits.parse_nvcc_version("gcc (Debian 12.2.0)")


@pytest.mark.parametrize(
    ("available", "bounds", "want"),
    [
        ({"g++": 12, "g++-12": 12}, (9, 13), "g++-12"),
        ({"g++": 12, "g++-12": 12, "g++-11": 11}, (9, 11), "g++-11"),
        ({"g++": 12, "g++-12": 12}, (9, 11), None),
        ({"g++": 14, "g++-13": 13, "g++-14": 14}, (9, 13), "g++-13"),
        ({"g++": 13}, (9, 13), "g++"),
        ({}, (9, 15), None),
    ],
)
def test_pick_host_compiler(available, bounds, want):
    assert toolkits.pick_host_compiler(available, bounds) == want


def test_debian_sources_list():
    text = debian.debian_sources_list("http://m.example/debian", ["trixie", "experimental"],
                                        undated=["experimental"])
    assert text.splitlines() == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://m.example/debian trixie main contrib non-free",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg check-valid-until=no] http://m.example/debian experimental main contrib non-free",
    ]


@pytest.mark.parametrize("row", [r for r in ROWS if r.debian], ids=lambda r: r.id)
def test_debian_pins_are_package_versions(row):
    # A dotted TOML key (libcudart11.0 = ...) silently becomes a nested table: pins must stay flat strings.
    assert all(isinstance(v, str) for v in row.debian.packages.values()), dict(row.debian.packages)
    assert "nvidia-cuda-toolkit" in row.debian.packages


def test_relocated_nvcc_profile_has_no_absolute_paths():
    text = toolkits.relocated_nvcc_profile()
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            value = line.split("=", 1)[1]
            assert "/usr" not in value.replace("$(_HERE_)", ""), line
    assert "NVVMIR_LIBRARY_DIR = $(_HERE_)/../nvvm/libdevice" in text  # CMake wants .../nvvm/libdevice


def test_cache_dir_precedence(tmp_path):
    assert locks.cache_dir({}, repo=tmp_path) == tmp_path / ".cache"
    assert locks.cache_dir({"KBIT_CACHE_DIR": "/x"}, repo=tmp_path) == Path("/x")


def _fake_toolkit(source):
    host = toolkits.HostCompiler("g++-12", "/usr/bin/g++-12", "12.2.0")
    return toolkits.Toolkit(source, CudaVersion(13, 0), "13.0.88", Path("/nvcc"), Path("/"), "line", host)


def test_find_toolkit_first_hit_wins_and_misses_are_reported(tmp_path):
    def miss(row, cache, env):
        raise toolkits.Miss("nothing here")

    hit = _fake_toolkit("pypi")
    assert toolkits.find_toolkit(CU130, tmp_path, {}, [("a", miss), ("b", lambda *a: hit)]) is hit
    with pytest.raises(ToolkitUnavailable, match=r"a: nothing here \| b: nothing here"):
        toolkits.find_toolkit(CU130, tmp_path, {}, [("a", miss), ("b", miss)])


def test_providers_that_do_not_apply_say_why(tmp_path):
    with pytest.raises(toolkits.Miss, match="pypi"):
        toolkits.pypi_toolkit(CU124, tmp_path, {})
    with pytest.raises(toolkits.Miss, match="debian"):
        toolkits.debian_toolkit(CU130, tmp_path, {})


# ---------------------------------------------------------------- build arguments


def test_cmake_args():
    args = cmake_args(CU124, revision="abc123", host_compiler="g++-13")
    assert "-DKBIT_CPU=OFF" in args and "-DKBIT_CUDA=ON" in args
    assert f"-DKBIT_CUDA_ARCHS={CU124.cmake_archs}" in args
    assert "-DKBIT_SOURCE_REVISION=abc123" in args and "-DCMAKE_CUDA_HOST_COMPILER=g++-13" in args


@pytest.mark.parametrize(("gxx", "gcc"), [("g++-13", "gcc-13"), ("/usr/bin/g++-12", "/usr/bin/gcc-12"), ("g++", "gcc")])
def test_c_compiler_for(gxx, gcc):
    assert c_compiler_for(gxx) == gcc
    assert f"-DCMAKE_C_COMPILER={gcc}" in cmake_args(CU124, revision="r", host_compiler=gxx)


def test_build_dirs_do_not_mix_container_and_host(tmp_path):
    assert build_dir(tmp_path, CU124, "container") == tmp_path / "build" / "cuda" / "cu124"
    assert build_dir(tmp_path, CU124, "host") != build_dir(tmp_path, CU124, "container")


def test_container_kind():
    assert [container_kind(r) for r in (CU118, CU120, CU130)] == ["debian", "nvidia", "pypi"]


# ---------------------------------------------------------------- python -m ci.matrix_query


def _query(*args):
    return subprocess.run([sys.executable, "-m", "ci.matrix_query", *args],
                          capture_output=True, text=True, check=False, cwd=REPO)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_matrix_query_agrees_with_the_loader(row):
    res = _query("--cmake-archs", str(row.cuda))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == row.cmake_archs


def test_matrix_query_unknown_version():
    res = _query("--cmake-archs", "12.7")
    assert res.returncode == 2 and "12.7" in res.stderr


def test_rows_are_frozen():
    with pytest.raises(AttributeError):
        replace(CU124).cuda = CudaVersion(1, 0)  # type: ignore[misc]


def test_a_changed_compiler_configures_from_scratch():
    from ci.kbit_ci.build_row import stale_cache_reason

    cache = "CMAKE_CXX_COMPILER:FILEPATH=/usr/bin/c++\nCMAKE_CUDA_HOST_COMPILER:STRING=g++-13\nKBIT_CUDA:BOOL=ON\n"
    assert stale_cache_reason(cache, ["-DCMAKE_CXX_COMPILER=g++-13", "-DKBIT_CUDA=ON"]) == (
        "CMAKE_CXX_COMPILER was /usr/bin/c++, now g++-13"
    )
    # The same compiler, spelled as a path or a name, keeps the cache (and the fast no-op rebuild).
    same = "CMAKE_CXX_COMPILER:FILEPATH=/usr/bin/g++-13\n"
    assert stale_cache_reason(same, ["-DCMAKE_CXX_COMPILER=g++-13", "-DKBIT_CUDA_ARCHS=70-real"]) is None
    assert stale_cache_reason("", ["-DCMAKE_CXX_COMPILER=g++-13"]) is None


# --- every row's archs are known to its own nvcc ------------------------------------------------------


def _gpu_codes(row) -> set[str] | None:
    """The sm_XY codes `nvcc --list-gpu-code` lists for the row's toolkit: run in its build image when
    a container engine has it, else the host toolkit venv of a PyPI row; None when neither is here."""
    import glob
    import re

    out = None
    eng, _ = engine.detect_engine()
    if eng is not None and engine.image_exists(eng, row.image):
        r = subprocess.run(eng.cmd("run", "--rm", *eng.run_flags, "--network", "none", row.image,
                                      "nvcc", "--list-gpu-code"), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out = r.stdout
    else:
        nvcc = sorted(glob.glob(str(REPO / ".cache" / "toolkits" / f"pypi-{row.id}" / "lib" / "python3*" /
                                    "site-packages" / "nvidia" / f"cu{row.cuda.major}" / "bin" / "nvcc")))
        if nvcc:
            out = subprocess.run([nvcc[0], "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    return None if out is None else {m.group(1) for m in re.finditer(r"\bsm_(\d+[af]?)\b", out)}


@pytest.mark.parametrize("row", [r for r in ROWS if r.debian or r.pypi], ids=lambda r: r.id)
def test_row_archs_are_known_to_its_toolkit(row) -> None:
    codes = _gpu_codes(row)
    if codes is None:
        pytest.skip(f"CUDA {row.cuda}'s toolkit is not here (no {row.image} image, no host toolkit venv)")
    unknown = sorted(set(row.archs) - codes)
    assert not unknown, f"CUDA {row.cuda}: nvcc --list-gpu-code does not know sm_{unknown}"
    assert row.ptx in codes


def test_the_gpu_code_list_tells_archs_apart() -> None:
    """The check above is evidence: a toolkit's list holds its archs and not made-up ones."""
    row = next((r for r in ROWS if (r.debian or r.pypi) and _gpu_codes(r) is not None), None)
    if row is None:
        pytest.skip("no row's toolkit is here")
    codes = _gpu_codes(row)
    assert row.ptx in codes and "77" not in codes and "91" not in codes


def test_unbuilt_rows_are_summed_up_once_with_the_command_that_builds_them() -> None:
    from ci.kbit_ci.build_row import unbuilt_summary

    by = {str(r.cuda): r for r in ROWS}
    skipped = [(by["12.0"], "x"), (by["12.6"], "y"), (by["11.8"], "CUDA 11.8 needs g++ 9..11, PATH has g++ 12.2.0")]
    lines = unbuilt_summary(skipped)
    assert lines[0] == "not built here: 3 rows of ci/matrix.toml"
    assert "  CUDA 12.0, 12.6: only NVIDIA's devel images carry their toolkits" in lines[1]
    assert lines[2] == "    nox -s build -- --cuda 12.0 --cuda 12.6"
    assert lines[3].startswith("  CUDA 11.8: CUDA 11.8 needs g++ 9..11") and lines[4] == "    nox -s build -- --cuda 11.8"
    host = unbuilt_summary(skipped[:1], mode="host")
    assert "installed CUDA of exactly that version" in host[1] and host[2] == "    nox -s build -- --host --cuda 12.0"
    assert unbuilt_summary([]) == []


def test_a_row_whose_nvcc_refuses_the_hosts_gxx_fetches_its_own() -> None:
    """11.8's nvcc takes g++ <= 11; on a Debian host whose PATH has only g++ 12 the build fetches the
    g++-11 its image installs (it is not asked for here: no network in this test)."""
    from ci.kbit_ci.toolkits import fetchable_host_compiler

    row = next(r for r in ROWS if str(r.cuda) == "11.8")
    assert row.debian is not None and row.debian.gxx == "g++-11" and row.gcc[1] == 11
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        assert fetchable_host_compiler(row) in ("g++-11", None)  # None: a host whose apt sources are not Debian's
    pypi_row = next(r for r in ROWS if r.pypi is not None)
    assert fetchable_host_compiler(pypi_row) is None


@pytest.mark.slow
def test_the_fetched_gxx_compiles() -> None:
    """g++-11 from Debian bookworm, unpacked into the cache (42 MB, once), compiles C++ with its own
    libstdc++ headers from where it lies."""
    from ci.kbit_ci.locks import cache_dir
    from ci.kbit_ci.toolkits import debian_host_compiler, fetchable_host_compiler

    row = next(r for r in ROWS if str(r.cuda) == "11.8")
    if fetchable_host_compiler(row) is None:
        pytest.skip("not a Debian host with apt-get, dpkg-deb and a Debian mirror")
    host = debian_host_compiler(row, cache_dir(os.environ))
    assert host.name == "g++-11" and host.major == 11
    r = subprocess.run([host.path, "-v", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True, check=True)
    assert str(Path(host.path).parents[1] / "include" / "c++" / "11") in r.stderr  # its own headers, relocated


# ---------------------------------------------------------------- module structure


def _package_imports(package: Path) -> dict[str, set[str]]:
    """{module: the sibling modules it imports} of a package's modules, from their source (import-time
    and function-level imports alike: a cycle through a deferred import is still a cycle)."""
    import ast

    names = {p.stem for p in package.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[name] = deps & names
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return [*path[path.index(d):], d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_build_tooling_has_no_import_cycle():
    graph = _package_imports(REPO / "ci" / "kbit_ci")
    assert {"locks", "debian", "engine", "images", "toolkits"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# ---------------------------------------------------------------- hash locks


def _bumped(row, **pins):
    from types import MappingProxyType

    return replace(row, pypi=replace(row.pypi, packages=MappingProxyType({**row.pypi.packages, **pins})))


def test_every_hash_lock_is_generated_from_the_matrix(tmp_path):
    assert locks.lock_mismatches(ROWS) == []
    req = tmp_path / "ci" / "requirements"
    req.mkdir(parents=True)
    for lock in (REPO / "ci" / "requirements").glob("cuda*.txt"):
        shutil.copy(lock, req / lock.name)
    assert locks.lock_mismatches(ROWS, tmp_path) == []
    row = next(r for r in ROWS if r.pypi)
    rows = [_bumped(r, **{"nvidia-cuda-nvcc": "13.0.99"}) if r is row else r for r in ROWS]
    (bad,) = locks.lock_mismatches(rows, tmp_path)  # a pin bumped in the matrix only
    assert f"CUDA {row.cuda}" in bad and "13.0.99" in bad and "python -m ci.lock_pypi" in bad
    lock = locks.pypi_lock_path(row, tmp_path)
    text = lock.read_text()
    lock.write_text(text.replace("\n", "\n# a note by hand\n", 1))
    (bad,) = locks.lock_mismatches(ROWS, tmp_path)
    assert "edited by hand" in bad
    lock.write_text(text)
    (req / "cuda199.txt").write_text("")
    (bad,) = locks.lock_mismatches(ROWS, tmp_path)
    assert bad.startswith("cuda199.txt: no PyPI row")
    (req / "cuda199.txt").unlink()
    lock.unlink()
    (bad,) = locks.lock_mismatches(ROWS, tmp_path)
    assert "no hash lock" in bad


def test_a_lock_is_its_rows_pins_with_their_digests(tmp_path):
    row = next(r for r in ROWS if r.pypi)
    digests = {n.lower(): [f"{i:064x}"] for i, n in enumerate(sorted(row.pypi.packages))}
    lock_file = tmp_path / "lock.txt"
    lock_file.write_text(locks.render_lock(row, digests))
    assert locks.locked_requirements(lock_file) == {n.lower(): v for n, v in row.pypi.packages.items()}
    assert locks.locked_digests(lock_file) == digests
    with pytest.raises(ValueError, match="no sha256"):
        locks.render_lock(row, {})


def test_ci_readme_names_every_module_and_only_real_ones():
    """ci/README.md's two tables are the architecture: each entry point and each kbit_ci module once."""
    import re

    text = (REPO / "ci" / "README.md").read_text()
    entry_points = set(re.findall(r"^\| `ci\.(\w+)` \|", text, re.M))
    assert entry_points == {p.stem for p in (REPO / "ci").glob("*.py")} - {"__init__"}
    documented = set()
    for cell in re.findall(r"^\| (`\w+`(?:, `\w+`)*) \|", text, re.M):
        documented |= set(re.findall(r"`(\w+)`", cell))
    assert documented == {p.stem for p in (REPO / "ci" / "kbit_ci").glob("*.py")} - {"__init__"}
