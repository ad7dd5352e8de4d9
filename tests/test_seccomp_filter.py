"""heel's seccomp filter on its own, entry by entry, against the kernel.

tests/filter_alone.c (built here with csrc/seccomp.c) runs each probe twice
in the same setting: root with every capability in a user namespace of its
own (or, for the probes that need the host's capabilities, as the host's
root), once without the filter and once with it.  Inside a sandbox heel
also drops every capability, and the kernel then refuses much of this on
its own; so tests/test_security_kernel.py, which attacks from inside a real
sandbox, could not tell whether an entry of the filter was lost.  Here the
control shows that the kernel would have let the call through, and the
filtered run that the filter alone stops it.  Where the kernel refuses a
call even in the control with the filter's own answer (a sysctl, a missing
module), the filtered run is still checked, and the test is skipped, saying
that it could not show the filter's part.

A probe named ``..._with_WORDS`` runs under the filter built with those
options (heel_seccomp_opts): ``unix``, ``seqpacket``, ``inet``, ``route``,
``nobind``, ``nolisten``, ``nofastopen``, ``nosched``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "filter_alone.c")

EPERM, ENOSYS, EAFNOSUPPORT = errno.EPERM, errno.ENOSYS, errno.EAFNOSUPPORT
ALLOWED = None  # the filter lets it through: the same answer as without it

#: What the filter answers each probe (filter_alone.c has their code).
EXPECTED = {
    # mounts and namespaces
    "mount": EPERM, "umount2": EPERM, "pivot_root": EPERM, "fsopen": EPERM, "fsconfig": EPERM,
    "fsmount": EPERM, "fspick": EPERM, "move_mount": EPERM, "open_tree": EPERM, "open_tree_attr": EPERM,
    "mount_setattr": EPERM, "listmount": EPERM, "statmount": EPERM, "quotactl_fd": EPERM, "chroot": EPERM, "unshare_user": EPERM, "unshare_mount": EPERM, "setns": EPERM,
    "clone_newuser": EPERM, "clone_newns": EPERM, "clone_newnet": EPERM, "clone_plain": ALLOWED,
    # clone3 keeps its flags in memory the filter cannot read: ENOSYS sends callers to clone()
    "clone3_plain": ENOSYS, "clone3_newuser": ENOSYS,
    # other processes
    "ptrace_traceme": EPERM, "process_vm_readv": EPERM, "process_vm_writev": EPERM, "pidfd_getfd": EPERM,
    "prlimit_other": EPERM, "prlimit_other_high_pointer": EPERM, "prlimit_self": ALLOWED,
    "sched_setaffinity_other": ALLOWED,  # in a pid namespace: the sandbox's own processes only
    "sched_setaffinity_other_with_nosched": EPERM, "sched_setscheduler_other_with_nosched": EPERM,
    "sched_setparam_other_with_nosched": EPERM, "sched_setattr_other_with_nosched": EPERM,
    "sched_setaffinity_self_with_nosched": ALLOWED,
    "setpriority_user": ALLOWED, "setpriority_user_with_nosched": EPERM, "ioprio_set_user_with_nosched": EPERM,
    # kernel facilities
    "keyctl": EPERM, "add_key": EPERM, "request_key": EPERM, "io_uring_setup": EPERM, "io_uring_enter": EPERM,
    "io_uring_register": EPERM, "userfaultfd": EPERM, "personality_no_aslr": EPERM, "personality_query": ALLOWED,
    "name_to_handle_at": EPERM, "lsm_set_self_attr": EPERM, "clock_settime": EPERM, "settimeofday": EPERM,
    "adjtimex_read": EPERM, "clock_adjtime_read": EPERM,
    "iopl_zero": EPERM, "ioperm_off": EPERM, "modify_ldt_read": EPERM,  # x86-64
    "x32_getpid": EPERM,  # x86-64: the x32 table, refused before the number is looked at
    # gone from today's kernels (ENOSYS), refused all the same
    "uselib": EPERM, "sysctl": EPERM, "nfsservctl": EPERM, "lookup_dcookie": EPERM,
    # files: no setuid or setgid bit by any path; the sticky bit stays
    "chmod_setuid": EPERM, "fchmod_setuid": EPERM, "fchmodat_setgid": EPERM, "fchmodat2_setuid": EPERM,
    "creat_setuid": EPERM, "open_creat_setuid": EPERM, "openat_creat_setuid": EPERM,
    "openat_tmpfile_setgid": EPERM, "mknod_setuid": EPERM, "mknodat_setgid": EPERM,
    "openat2_creat": ENOSYS,  # its mode is in memory too: callers fall back to openat()
    "chmod_sticky": ALLOWED, "fcntl_setlease": EPERM,
    # terminals
    "ioctl_tiocsti": EPERM, "ioctl_tiocsti_high_bits": EPERM, "ioctl_tiocsetd": EPERM,
    "ioctl_tioclinux": EPERM, "ioctl_tiocgwinsz": ALLOWED,
    # sockets: a family the filter does not know answers as a kernel without it would
    "socket_packet": EAFNOSUPPORT, "socket_raw_icmp": EPERM, "socket_udp": EPERM, "socket_udp6": EPERM,
    "socket_tcp": EPERM, "socket_tcp_with_inet": ALLOWED, "socket_tcp_nonblock_with_inet": ALLOWED,
    "socket_udp_with_inet": EPERM, "socket_sctp_with_inet": EPERM, "socket_netlink_route": EPERM,
    "socket_netlink_route_with_route": ALLOWED, "socket_netlink_audit_with_route": EPERM,
    "socket_unix": EPERM, "socket_unix_with_unix": ALLOWED, "socket_unix_seqpacket_with_seqpacket": ALLOWED,
    "socket_unix_stream_with_seqpacket": EPERM, "socketpair_dgram": EPERM, "socketpair_stream": ALLOWED,
    "bind_with_unix_nobind": EPERM, "bind_with_unix": ALLOWED, "listen_with_unix_nolisten": EPERM,
    "passcred_with_nobind": EPERM, "passcred": ALLOWED,
    "so_linger": ALLOWED, "so_linger_with_nobind": ALLOWED, "so_linger_with_nolinger": EPERM,
    "so_linger_with_nobind_nolinger": EPERM, "passcred_with_nolinger": ALLOWED,
    "passcred_with_nobind_nolinger": EPERM, "so_keepalive_with_nolinger": ALLOWED,
    "passrights": ALLOWED, "passrights_with_nolinger": EPERM, "passrights_with_nobind_nolinger": EPERM,
    "sendto_fastopen_with_inet_nofastopen": EPERM, "sendmsg_fastopen_with_inet_nofastopen": EPERM,
    "sendmmsg_fastopen_with_inet_nofastopen": EPERM,
    # the host's root only (invalid arguments where the call could change the host)
    "bpf": EPERM, "perf_event_open": EPERM, "fanotify_init": EPERM, "mknod_char_device": EPERM,
    "reboot_bad_magic": EPERM, "kexec_load_bad_flags": EPERM, "kexec_file_load_bad_flags": EPERM,
    "vhangup_without_terminal": EPERM, "init_module_empty": EPERM,
    "finit_module_bad_fd": EPERM, "delete_module_absent": EPERM, "acct_absent": EPERM, "swapon_absent": EPERM,
    "swapoff_absent": EPERM, "quotactl_absent": EPERM, "syslog_size": EPERM, "open_by_handle_at": EPERM,
}

#: Probes that exist on some architectures only (filter_alone.c leaves them out elsewhere).
ARCH_ONLY = {"iopl_zero", "ioperm_off", "modify_ldt_read", "x32_getpid", "creat_setuid", "open_creat_setuid",
             "uselib", "sysctl", "nfsservctl", "lookup_dcookie"}


@pytest.fixture(scope="module")
def filter_alone(tmp_path_factory) -> str:
    if not os.path.isdir(CSRC):
        pytest.skip("csrc/ is not here (an installed copy of the tests): nothing to build the filter from")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build tests/filter_alone.c")
    binary = str(tmp_path_factory.mktemp("filter") / "filter_alone")
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-I", CSRC, "-o", binary, SOURCE,
                    os.path.join(CSRC, "seccomp.c")], check=True, timeout=120)
    return binary


@pytest.fixture(scope="module")
def probes(filter_alone) -> dict[str, str]:
    listing = subprocess.run([filter_alone, "--list"], capture_output=True, text=True, check=True, timeout=10)
    return dict(line.split() for line in listing.stdout.splitlines())


def test_every_probe_has_an_expectation(probes):
    assert set(probes) <= set(EXPECTED), set(probes) - set(EXPECTED)
    assert set(EXPECTED) - set(probes) <= ARCH_ONLY, set(EXPECTED) - set(probes)


def _run(binary: str, name: str, how: str, where: str) -> int:
    """0 when the probe's call worked, else its errno."""
    result = subprocess.run([binary, name, how, where], capture_output=True, text=True, timeout=20,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    words = result.stdout.split()
    if result.returncode == 2 and words[1:2] == ["setup"]:
        if how == "control" and "unshare" in result.stdout:
            pytest.skip(f"no user namespace for the probe here: {result.stdout.strip()}")
        pytest.fail(f"{how}: {result.stdout.strip()} {result.stderr.strip()}")
    assert result.returncode == 0 and words[:1] == [name], result
    return 0 if words[1:] == ["ok"] else int(words[2])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_filter_alone_refuses(filter_alone, probes, name, tmp_path):
    if name not in probes:
        pytest.skip(f"{name}: not a question on this architecture")
    if probes[name] == "root" and os.geteuid() != 0:
        pytest.skip(f"{name} needs a capability of the host's root for its control")
    os.chmod(tmp_path, 0o755)
    control = _run(filter_alone, name, "control", str(tmp_path))
    filtered = _run(filter_alone, name, "filtered", str(tmp_path))
    expected = EXPECTED[name]
    if expected is ALLOWED:
        assert filtered == control, (name, os.strerror(filtered) if filtered else "ok")
        return
    assert filtered == expected, (name, os.strerror(filtered) if filtered else "ok")
    if control == expected:
        pytest.skip(f"the kernel here answers {name} with {errno.errorcode[control]} itself: "
                    "this run cannot show the filter's part")
