"""A real NVIDIA GPU inside the sandbox: ``nvidia-smi``, the CUDA driver API
(a kernel compiled from PTX by the driver, run on the device, its result read
back) and, where PyTorch is installed, a matrix product on the GPU.

Each runs at every level with ``allow_gpu`` (the default) and must give what
the same program gives on the host, unsandboxed, in the same test: that is
the control.  Without ``allow_gpu`` the same programs must fail, and the
device node must be refused at open (EACCES), seen from inside.

These tests need a machine with an NVIDIA GPU and its driver
(``/dev/nvidiactl`` and ``nvidia-smi``); they skip elsewhere, which is most
machines, CI's included.  tests/gpu_check.sh runs them (and test_gpu.py, the
stand-in-node tests) on such a machine as root and as an unprivileged user;
the README says where and when they last ran.
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import heel
from helpers import explain

NVIDIA_SMI = shutil.which("nvidia-smi")
HAVE_GPU = os.path.exists("/dev/nvidiactl") and NVIDIA_SMI is not None

pytestmark = pytest.mark.skipif(not HAVE_GPU, reason="no NVIDIA GPU here (/dev/nvidiactl and nvidia-smi)")

LEVELS = [heel.IsolationLevel.STRICT, heel.IsolationLevel.DEFAULT, heel.IsolationLevel.PERMISSIVE]
#: A GPU program's first start (driver JIT, PyTorch's import) can take a while.
GPU_TIMEOUT = 180

#: The CUDA driver API through ctypes: no toolkit, no framework.  A kernel
#: written in PTX adds one to each of a million integers that cuMemsetD32
#: set; the driver compiles it for the device.  Prints one line: the device's
#: name and what came back, or the first call that failed and its error code.
CUDA_PROGRAM = textwrap.dedent(r"""
    import ctypes, sys

    PTX = b'''
    .version 6.0
    .target sm_50
    .address_size 64
    .visible .entry add_one(.param .u64 data, .param .u32 count)
    {
        .reg .pred %p<2>;
        .reg .b32 %r<8>;
        .reg .b64 %rd<6>;
        ld.param.u64 %rd1, [data];
        ld.param.u32 %r1, [count];
        mov.u32 %r2, %ctaid.x;
        mov.u32 %r3, %ntid.x;
        mov.u32 %r4, %tid.x;
        mad.lo.s32 %r5, %r2, %r3, %r4;
        setp.ge.u32 %p1, %r5, %r1;
        @%p1 bra DONE;
        cvta.to.global.u64 %rd2, %rd1;
        mul.wide.u32 %rd3, %r5, 4;
        add.s64 %rd4, %rd2, %rd3;
        ld.global.u32 %r6, [%rd4];
        add.s32 %r7, %r6, 1;
        st.global.u32 [%rd4], %r7;
    DONE:
        ret;
    }
    '''

    def main(library):
        try:
            cuda = ctypes.CDLL(library)
        except OSError as exc:
            return "load " + str(exc)
        def call(name, *args):
            code = getattr(cuda, name)(*args)
            if code:
                raise RuntimeError(f"{name} {code}")
        try:
            call("cuInit", 0)
            count = ctypes.c_int()
            call("cuDeviceGetCount", ctypes.byref(count))
            device = ctypes.c_int()
            call("cuDeviceGet", ctypes.byref(device), 0)
            name = ctypes.create_string_buffer(256)
            call("cuDeviceGetName", name, 256, device)
            context = ctypes.c_void_p()
            call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
            call("cuCtxSetCurrent", context)
            n = 1 << 20
            memory = ctypes.c_uint64()
            call("cuMemAlloc_v2", ctypes.byref(memory), ctypes.c_size_t(n * 4))
            call("cuMemsetD32_v2", memory, ctypes.c_uint(0xC0FFEE), ctypes.c_size_t(n))
            module = ctypes.c_void_p()
            call("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(PTX))
            function = ctypes.c_void_p()
            call("cuModuleGetFunction", ctypes.byref(function), module, b"add_one")
            data, size = ctypes.c_uint64(memory.value), ctypes.c_uint32(n)
            params = (ctypes.c_void_p * 2)(ctypes.addressof(data), ctypes.addressof(size))
            call("cuLaunchKernel", function, (n + 255) // 256, 1, 1, 256, 1, 1, 0, None, params, None)
            call("cuCtxSynchronize")
            back = (ctypes.c_uint32 * n)()
            call("cuMemcpyDtoH_v2", back, memory, ctypes.c_size_t(n * 4))
            call("cuMemFree_v2", memory)
            call("cuDevicePrimaryCtxRelease_v2", device)
        except RuntimeError as exc:
            return "failed " + str(exc)
        right = sum(1 for v in back if v == 0xC0FFEE + 1)
        return f"devices={count.value} name={name.value.decode()} right={right}/{n}"

    print(main(sys.argv[1]))
""")

#: The device node a driver opens first, from inside: "ok" or the errno's name.
OPEN_NODE = textwrap.dedent("""
    import errno, os, sys
    try:
        os.close(os.open("/dev/nvidiactl", os.O_RDWR))
        print("open ok")
    except OSError as exc:
        print("open " + errno.errorcode[exc.errno])
""")

TORCH_PROGRAM = textwrap.dedent("""
    import torch
    if not torch.cuda.is_available():
        print("no cuda")
        raise SystemExit(0)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(512, 512, generator=g, dtype=torch.float64)
    b = torch.randn(512, 512, generator=g, dtype=torch.float64)
    on_gpu = (a.cuda() @ b.cuda()).cpu()
    close = torch.allclose(on_gpu, a @ b, rtol=1e-9, atol=1e-9)
    print(f"name={torch.cuda.get_device_name(0)} close={close}")
""")


def _libcuda() -> str:
    """The host's libcuda, by its full path: the sandbox's environment is
    clean (no LD_LIBRARY_PATH), so the program is told where it is."""
    found = ctypes.util.find_library("cuda")
    probe = subprocess.run(
        [sys.executable, "-c",
         "import ctypes, sys; ctypes.CDLL(sys.argv[1]);"
         "print(next(l.split()[-1] for l in open('/proc/self/maps') if 'libcuda.so' in l))",
         found or "libcuda.so.1"],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"the host cannot load libcuda: {probe.stderr.strip()[-300:]}")
    return os.path.realpath(probe.stdout.strip())


def _python_grants() -> list[str]:
    """The running Python's prefixes (a venv in /opt, say), for STRICT,
    which otherwise opens only the system's runtime directories."""
    return sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)})


def _root_at_permissive(level) -> bool:
    """Root's sandboxes at PERMISSIVE run as the host's uid 0, whose /proc
    stays read-only: CUDA cannot name its threads there, and cuInit fails
    with 304 (README, "GPUs")."""
    return level is heel.IsolationLevel.PERMISSIVE and os.geteuid() == 0


def _config(level, allow_gpu: bool, **extra) -> heel.SandboxConfig:
    return heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=allow_gpu),
                              executable=_python_grants(), **extra)


def _host(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=GPU_TIMEOUT)


async def _python(sb, code: str, *args: str):
    return await sb.command(sys.executable).args(["-c", code, *args]).timeout(GPU_TIMEOUT).output()


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_nvidia_smi_sees_the_gpu_inside(level):
    host = _host([NVIDIA_SMI, "-L"])
    assert host.returncode == 0 and host.stdout.startswith(b"GPU 0"), explain(host)
    async with heel.Sandbox(_config(level, True)) as sb:
        out = await sb.command(NVIDIA_SMI).arg("-L").timeout(GPU_TIMEOUT).output()
        query = await sb.command(NVIDIA_SMI).args(
            ["--query-gpu=name,memory.total", "--format=csv,noheader"]).timeout(GPU_TIMEOUT).output()
    assert out.returncode == 0, explain(out)
    assert out.stdout == host.stdout
    assert query.returncode == 0, explain(query)
    assert query.stdout.strip(), explain(query)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_nvidia_smi_fails_without_allow_gpu(level):
    async with heel.Sandbox(_config(level, False)) as sb:
        out = await sb.command(NVIDIA_SMI).arg("-L").timeout(GPU_TIMEOUT).output()
        node = await _python(sb, OPEN_NODE)
        listing = await _python(sb, "import os; print(os.listdir('/proc/driver/nvidia')"
                                    " if os.path.isdir('/proc/driver/nvidia') else 'none')")
    assert out.returncode != 0, explain(out)
    assert b"GPU 0" not in out.stdout, explain(out)
    assert node.stdout.decode().strip() == f"open {errno.errorcode[errno.EACCES]}", explain(node)
    assert listing.stdout.decode().strip() in ("[]", "none"), explain(listing)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_a_cuda_kernel_runs_inside(level):
    library = _libcuda()
    host = _host([sys.executable, "-c", CUDA_PROGRAM, library])
    assert host.returncode == 0, explain(host)
    expected = host.stdout.decode().strip()
    assert expected.startswith("devices=") and expected.endswith(f"right={1 << 20}/{1 << 20}"), expected
    async with heel.Sandbox(_config(level, True)) as sb:
        out = await _python(sb, CUDA_PROGRAM, library)
    assert out.returncode == 0, explain(out)
    if _root_at_permissive(level):
        assert out.stdout.decode().strip() == "failed cuInit 304", explain(out)
    else:
        assert out.stdout.decode().strip() == expected, explain(out)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_cuda_fails_without_allow_gpu(level):
    library = _libcuda()
    async with heel.Sandbox(_config(level, False)) as sb:
        out = await _python(sb, CUDA_PROGRAM, library)
        node = await _python(sb, OPEN_NODE)
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().startswith("failed cuInit "), explain(out)
    assert node.stdout.decode().strip() == f"open {errno.errorcode[errno.EACCES]}", explain(node)


async def test_a_cuda_kernel_runs_under_a_memory_limit():
    """``memory`` is RLIMIT_DATA, not the address space: the driver's large
    address-space reservations still fit under a few GiB."""
    library = _libcuda()
    limits = heel.ResourceLimits(memory=2 << 30)
    async with heel.Sandbox(_config(heel.IsolationLevel.DEFAULT, True, limits=limits)) as sb:
        out = await _python(sb, CUDA_PROGRAM, library)
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().strip().endswith(f"right={1 << 20}/{1 << 20}"), explain(out)


def _torch_env() -> dict:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=GPU_TIMEOUT)
    if probe.stdout.strip() != "True":
        pytest.skip(f"no PyTorch with CUDA on the host: {probe.stderr.strip()[-300:]}")
    # Where the host finds libcuda through LD_LIBRARY_PATH, so must the sandbox.
    return {"env_passthrough": ["LD_LIBRARY_PATH"]} if os.environ.get("LD_LIBRARY_PATH") else {}


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_a_torch_matrix_product_runs_inside(level):
    extra = _torch_env()
    host = _host([sys.executable, "-c", TORCH_PROGRAM])
    assert host.returncode == 0, explain(host)
    expected = host.stdout.decode().strip()
    assert expected.startswith("name=") and expected.endswith("close=True"), expected
    async with heel.Sandbox(_config(level, True, **extra)) as sb:
        out = await _python(sb, TORCH_PROGRAM)
    assert out.returncode == 0, explain(out)
    if _root_at_permissive(level):
        assert out.stdout.decode().strip() == "no cuda", explain(out)
    else:
        assert out.stdout.decode().strip() == expected, explain(out)


async def test_torch_sees_no_gpu_without_allow_gpu():
    extra = _torch_env()
    async with heel.Sandbox(_config(heel.IsolationLevel.DEFAULT, False, **extra)) as sb:
        out = await _python(sb, TORCH_PROGRAM)
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().strip() == "no cuda", explain(out)
