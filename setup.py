"""Build heel: the cffi extension (csrc/build.py) and heel-init, the small
executable that runs as the sandbox's pid 1 and starts its commands
(csrc/init.c, with the seccomp filter of csrc/seccomp.c and the Landlock
calls of csrc/landlock.c)."""
import os
import shlex
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

if not sys.platform.startswith("linux"):
    sys.exit("heel supports only Linux for now (Landlock + seccomp); macOS and Windows are not implemented")

# Defence in depth for the module and heel-init alike: each compiler flag is
# kept only where this compiler takes it (-fcf-protection is x86's, older
# compilers lack -fstack-clash-protection), so a plain gcc still builds.
HARDENING_CFLAGS = ["-fstack-protector-strong", "-fstack-clash-protection", "-fcf-protection"]
# Relocated data read-only once loaded, no lazy binding.
HARDENING_LDFLAGS = ["-Wl,-z,relro,-z,now"]


class BuildExtWithInit(build_ext):
    """build_ext that also compiles and links heel-init next to the module."""

    def build_extensions(self):
        self.hardening_cflags = self.accepted_cflags()
        for ext in self.extensions:
            ext.extra_compile_args = [*ext.extra_compile_args, *self.hardening_cflags]
            ext.extra_link_args = [*ext.extra_link_args, *HARDENING_LDFLAGS]
        super().build_extensions()

    def run(self):
        super().run()
        self.build_init()

    def compiles(self, source, flags):
        """Whether this build's compiler takes source with these flags, without a warning."""
        from setuptools._distutils.errors import CompileError

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            try:
                self.compiler.compile([path], output_dir=tmp, extra_postargs=["-O2", "-Werror", *flags])
            except CompileError:
                return False
        return True

    def accepted_cflags(self):
        flags = [flag for flag in HARDENING_CFLAGS if self.compiles("int x;\n", [flag])]
        # Checked libc calls (they need -O, which both builds pass), unless
        # the compiler or CFLAGS chose a level already: defining it again
        # would warn, or lower it.
        if self.compiles("#ifdef _FORTIFY_SOURCE\n#error already set\n#endif\nint x;\n", []):
            flags.append("-D_FORTIFY_SOURCE=2")
        return flags

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
            extra_postargs=["-O2", "-Wall", *self.hardening_cflags],
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
        # Static-pie first (its own addresses randomised, like any PIE's),
        # then static, then dynamic; the last, a plain link, raises what the
        # linker said.
        for link_flags in (["-static-pie", *HARDENING_LDFLAGS], ["-static", *HARDENING_LDFLAGS],
                           HARDENING_LDFLAGS, []):
            try:
                compiler.link_executable(objects, "_heel_init", output_dir=package_dir,
                                         extra_preargs=user_flags, extra_postargs=link_flags)
                return
            except LinkError:
                if not link_flags:
                    raise


setup(
    cffi_modules=["csrc/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithInit},
    # The extension uses only the stable ABI: one wheel serves every CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
