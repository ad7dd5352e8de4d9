"""The build itself (setup.py): what a packager's flags and heel's own
hardening reach, in both compiled parts, the cffi module and heel-init.
One wheel is built from a copy of this checkout, the way pip builds it, and
its binaries are read with binutils (which every gcc toolchain has)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A build id no linker picks by itself: passed in LDFLAGS, found in a
#: binary only if LDFLAGS reached its link.
MARKER_BUILD_ID = "4845454c4c444653"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("readelf") is None,
                       reason="needs gcc and binutils"),
]


def _setuptools_builds_this() -> bool:
    """Whether this environment's setuptools reads pyproject.toml's license
    (>= 77); otherwise pip builds in an isolated environment of its own."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def _build_wheel(base, **env_vars: str) -> dict[str, str]:
    """Build a wheel of a copy of this checkout with these environment
    variables; the paths of its heel/_heel_init and heel/_heel.abi3.so."""
    src = base / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc",
                    ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "heel"), src / "heel",
                    ignore=shutil.ignore_patterns("*.so", "_heel_init", "__pycache__", "_heel.c"))
    env = {key: value for key, value in os.environ.items() if key not in ("CFLAGS", "LDFLAGS")}
    env.update(env_vars)
    isolation = ["--no-build-isolation"] if _setuptools_builds_this() else []
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                           "-w", str(base / "dist"), str(src)],
                          env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    (wheel,) = (base / "dist").glob("heel-*.whl")
    out = base / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(out)
    (module,) = (out / "heel").glob("_heel*.so")
    return {"init": str(out / "heel" / "_heel_init"), "module": str(module)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheel built with an LDFLAGS build id, unpacked."""
    return _build_wheel(tmp_path_factory.mktemp("build"), LDFLAGS=f"-Wl,--build-id=0x{MARKER_BUILD_ID}")


def _readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


def _gcc_links(tmp_path, *flags: str) -> bool:
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    return subprocess.run(["gcc", *flags, str(probe), "-o", str(tmp_path / "probe")],
                          capture_output=True).returncode == 0


def test_ldflags_reach_both_links(built):
    """LDFLAGS (a sanitizer's runtime, a packager's linker options) reach
    heel-init's link as they reach the module's: distutils links an
    executable with $CC alone, so setup.py has to pass them."""
    for path in (built["module"], built["init"]):
        assert MARKER_BUILD_ID in _readelf("-n", path), path


def test_module_is_hardened(built):
    """Each flag is one the compiler takes: gcc takes all of them."""
    dynamic = _readelf("-d", built["module"])
    assert "BIND_NOW" in dynamic
    assert "GNU_RELRO" in _readelf("-l", built["module"])
    symbols = _readelf("--dyn-syms", built["module"])
    assert "__stack_chk_fail" in symbols        # -fstack-protector-strong
    assert "__snprintf_chk" in symbols          # _FORTIFY_SOURCE


def test_heel_init_is_static_and_hardened(built, tmp_path):
    headers = _readelf("-l", built["init"])
    assert "GNU_RELRO" in headers
    if _gcc_links(tmp_path, "-static"):
        assert "INTERP" not in headers, "heel-init is linked statically where the C library allows"
    if _gcc_links(tmp_path, "-static-pie"):
        # Its own address randomised, and its relocations read-only once done.
        assert "DYN" in _readelf("-h", built["init"]), "static-pie where the toolchain has it"
        assert "BIND_NOW" in _readelf("-d", built["init"])
    symbols = _readelf("-s", built["init"])
    assert "__snprintf_chk" in symbols          # _FORTIFY_SOURCE on heel-init's own calls
    if platform.machine() == "x86_64":
        main = subprocess.run(["objdump", "-d", "--disassemble=main", built["init"]],
                              capture_output=True, text=True, check=True).stdout
        assert "%fs:0x28" in main               # main's arrays have a stack canary


def test_a_sanitizer_build_links(tmp_path):
    """CFLAGS=-fsanitize=address (a developer's ASan build) builds: heel-init's
    objects need the sanitizer's runtime at link time, and a sanitizer
    cannot be linked statically, so heel-init comes out dynamic.  Before,
    its link had neither CFLAGS nor the runtime, and the whole build failed."""
    if not _gcc_links(tmp_path, "-fsanitize=address"):
        pytest.skip("gcc has no AddressSanitizer runtime here")
    built = _build_wheel(tmp_path, CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1")
    for path in (built["module"], built["init"]):
        assert "libasan" in _readelf("-d", path), path
