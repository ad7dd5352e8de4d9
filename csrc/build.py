"""The cffi builder for heel's C core (setup.py: cffi_modules=["csrc/build.py:ffibuilder"]).

The cdef is read from heel_cdef.h, a declarations-only header, because cffi's
parser rejects preprocessor lines; the real header, heel.h, goes to the
compiler.  The module is built against the limited API (abi3).
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools wants source paths relative to the project root (the cwd of a build).
REL = os.path.relpath(HERE)

ffibuilder = FFI()
with open(os.path.join(HERE, "heel_cdef.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "heel._heel",
    """
    #include "heel.h"
    static const char *heel_native_version(void) { return HEEL_NATIVE_VERSION; }
    """,
    sources=[os.path.join(REL, name) for name in ("landlock.c", "seccomp.c", "spawn.c", "relay.c")],
    include_dirs=[REL],
    extra_compile_args=["-O2", "-Wall", "-fvisibility=hidden"],
    py_limited_api=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
