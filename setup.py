"""Build heel: the cffi extension (csrc/build.py) and heel-init, the small
executable that runs as the sandbox's pid 1 and starts its commands
(csrc/init.c, with the seccomp filter of csrc/seccomp.c and the Landlock
calls of csrc/landlock.c)."""
import os
import shlex
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

if not sys.platform.startswith("linux"):
    sys.exit("heel supports only Linux for now (Landlock + seccomp); macOS and Windows are not implemented")


class BuildExtWithInit(build_ext):
    """build_ext that also compiles and links heel-init next to the module."""

    def run(self):
        super().run()
        self.build_init()

    def build_init(self):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.errors import LinkError
        from setuptools._distutils.sysconfig import customize_compiler

        compiler = new_compiler()
        customize_compiler(compiler)
        objects = compiler.compile(
            [os.path.join("csrc", name) for name in ("init.c", "seccomp.c", "landlock.c")],
            output_dir=self.build_temp,
            include_dirs=["csrc"],
            extra_postargs=["-O2", "-Wall"],
        )
        package_dir = "heel" if self.inplace else os.path.join(self.build_lib, "heel")
        # distutils links an executable with $CC alone, where it links the
        # module with LDFLAGS and CFLAGS too: pass them here the same way, or
        # a packager's linker options never reach heel-init, and a CFLAGS
        # sanitizer's runtime is missing from its link.
        user_flags = [word for name in ("LDFLAGS", "CFLAGS")
                      for word in shlex.split(os.environ.get(name, ""))]
        # Static when the C library allows it: exec'ing a static binary skips
        # the dynamic loader, which is a good part of a command's start-up.
        try:
            compiler.link_executable(objects, "_heel_init", output_dir=package_dir,
                                     extra_preargs=user_flags, extra_postargs=["-static"])
        except LinkError:
            compiler.link_executable(objects, "_heel_init", output_dir=package_dir,
                                     extra_preargs=user_flags)


setup(
    cffi_modules=["csrc/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithInit},
    # The extension uses only the stable ABI: one wheel serves every CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
