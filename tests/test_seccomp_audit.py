"""Mutation audit of csrc/seccomp.c (r36): the probes that killed its survivors.

tests/test_seccomp_filter.py runs tests/filter_alone.c; a mutation audit of
the filter found weakenings of seccomp.c that none of its probes (nor the
attacks from real sandboxes) noticed.  Each probe here kills one or more of
them.  AUDIT below is compiled together with filter_alone.c (included, its
main() renamed), so it runs in the same setting, with the same namespaces,
the same options ("_with_WORDS") and the same report format, and
test_seccomp_filter._run() reads it.

Two kinds of probe:

* plain ones, as in filter_alone.c: the control (no filter) shows that the
  kernel lets the call through or answers something else, the filtered run
  that the filter alone says EPERM;

* ``verdict_...`` ones, for calls the kernel answers as the filter does
  (a syscall number past the last one heel knows: the kernel says ENOSYS;
  AF_VSOCK: EAFNOSUPPORT where it has no vsock), so that no answer can tell
  the filter's refusal from the kernel's.  Before heel's filter they install
  a marker filter of their own that answers that one syscall with errno
  MARK.  Of two filters that both return ERRNO the one installed last (heel's)
  decides; a call heel's filter lets through reaches the marker instead.  So
  MARK says "heel allowed it", whatever the kernel would have done, and the
  control (the marker alone) shows that the marker is reached.
"""

from __future__ import annotations

import errno
import os
import platform

import pytest

from helpers import compile_c
from test_seccomp_filter import CSRC, _run

TESTS = os.path.dirname(os.path.abspath(__file__))
MARK = 4000  # the marker filter's errno: "heel's filter let the call through"

AUDIT = r"""
#define main filter_alone_main
#include "filter_alone.c"
#undef main

#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76
#endif
#define MARK 4000

static const char *const audit_userns[] = {
    "clone_newpid", "clone_newipc", "clone_newuts", "clone_newcgroup",
    "setpriority_process_other_with_nosched", "ioprio_set_process_other_with_nosched",
    "setpriority_user_self_with_nosched", "ioprio_set_user_self_with_nosched",
    "ioctl_tiocsserial", "socket_raw_tcp_with_inet", "socket_unix_dgram_with_seqpacket", "socketpair_inet",
    "passpidfd_with_nobind", "passpidfd_with_nobind_nolinger", "passpidfd",
    "sendmsg_fastopen_arg3_zero_with_inet_nofastopen",
    "verdict_nr_469", "verdict_nr_470", "verdict_nr_1000", "verdict_nr_0x3fffffff", "verdict_getpid",
    "verdict_socket_vsock", "verdict_socket_vsock_with_unix_inet_route",
};

static const char *const audit_root[] = {"mknod_block_device"};

/* The syscall a verdict_ probe makes, for its marker filter. */
static uint32_t verdict_nr(const char *name)
{
    if (!strncmp(name, "verdict_nr_", 11))
        return (uint32_t)strtoul(name + 11, NULL, 0); /* "470", "0x3fffffff" */
    if (!strncmp(name, "verdict_socket", 14))
        return SYS_socket;
    return SYS_getpid;
}

/* ERRNO(MARK) for that one syscall of the native table, ALLOW for the rest. */
static void install_marker(const char *name)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, heel_seccomp_arch(), 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, verdict_nr(name), 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | MARK),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(code) / sizeof(code[0]), code};

    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        setup_failed("the marker filter");
}

static int audit_probe(const char *name)
{
    int one = 1, pair[2];

    /* clone's other namespace flags (filter_alone.c asks for user, mount and net) */
    if (!strcmp(name, "clone_newpid"))
        return try_clone(CLONE_NEWPID);
    if (!strcmp(name, "clone_newipc"))
        return try_clone(CLONE_NEWIPC);
    if (!strcmp(name, "clone_newuts"))
        return try_clone(CLONE_NEWUTS);
    if (!strcmp(name, "clone_newcgroup"))
        return try_clone(CLONE_NEWCGROUP);

    /* Another process by pid, with a `which` that is allowed */
    if (!strcmp(name, "setpriority_process_other_with_nosched")) {
        pid_t child = sleeper();
        errno = 0;
        int nice = getpriority(PRIO_PROCESS, child);
        report(setpriority(PRIO_PROCESS, child, nice));
        end(child);
        return 0;
    }
    if (!strcmp(name, "ioprio_set_process_other_with_nosched")) {
        pid_t child = sleeper();
        report(syscall(SYS_ioprio_set, 1 /* IOPRIO_WHO_PROCESS */, child, 2 << 13 | 4 /* BE 4 */));
        end(child);
        return 0;
    }
    /* Every process of the caller's own uid (who 0): main() put us in a pid
     * namespace of our own, where the kernel reaches our processes only. */
    if (!strcmp(name, "setpriority_user_self_with_nosched")) {
        errno = 0;
        int nice = getpriority(PRIO_PROCESS, 0);
        return ASK(setpriority(PRIO_USER, 0, nice));
    }
    if (!strcmp(name, "ioprio_set_user_self_with_nosched"))
        return ASK(syscall(SYS_ioprio_set, 3 /* IOPRIO_WHO_USER */, 0, 2 << 13 | 4));

    /* A pty answers TIOCSSERIAL with ENOTTY (no serial port behind it) */
    if (!strcmp(name, "ioctl_tiocsserial")) {
        char serial[256] = {0};
        return ASK(ioctl(own_terminal(), TIOCSSERIAL, serial));
    }
    if (!strcmp(name, "socket_raw_tcp_with_inet")) /* CAP_NET_RAW of the net namespace */
        return socket_probe(AF_INET, SOCK_RAW, IPPROTO_TCP);
    if (!strcmp(name, "socket_unix_dgram_with_seqpacket"))
        return socket_probe(AF_UNIX, SOCK_DGRAM, 0);
    if (!strcmp(name, "socketpair_inet"))
        return ASK(socketpair(AF_INET, SOCK_STREAM, 0, pair));
    if (!strncmp(name, "passpidfd", 9)) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0)
            setup_failed("socketpair");
        return ASK(setsockopt(pair[0], SOL_SOCKET, SO_PASSPIDFD, &one, sizeof(one)));
    }
    /* sendmsg's flags are its argument 2; argument 3 is 0 here, not whatever
     * the register held */
    if (!strcmp(name, "sendmsg_fastopen_arg3_zero_with_inet_nofastopen")) {
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(9), .sin_addr = {htonl(INADDR_LOOPBACK)}};
        char byte = 'x';
        struct iovec iov = {&byte, 1};
        struct msghdr msg = {.msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov, .msg_iovlen = 1};
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            setup_failed("socket(AF_INET)");
        return ASK(syscall(SYS_sendmsg, fd, &msg, MSG_FASTOPEN, 0L, 0L, 0L));
    }

    /* Verdicts: MARK when heel's filter let the call through */
    if (!strncmp(name, "verdict_nr_", 11))
        return ASK(syscall((long)verdict_nr(name), 0L, 0L, 0L, 0L, 0L, 0L));
    if (!strcmp(name, "verdict_getpid"))
        return ASK(syscall(SYS_getpid));
    if (!strncmp(name, "verdict_socket_vsock", 20))
        return socket_probe(40 /* AF_VSOCK */, SOCK_STREAM, 0);

    /* The host's root only */
    if (!strcmp(name, "mknod_block_device")) {
        report(mknod("blk", S_IFBLK | 0600, makedev(7, 250)));
        unlink("blk");
        return 0;
    }
    printf("%s unknown\n", name);
    return 3;
}

/* The _user_self probes name "every process of this uid": in a pid
 * namespace of their own, so that a filter that lets them through changes
 * nothing outside.  The marker filter goes under heel's. */
static int audit_prepare(const char *name)
{
    if (strstr(name, "_user_self")) {
        pid_t pid;
        int status;

        if (unshare(CLONE_NEWPID) < 0)
            setup_failed("unshare(CLONE_NEWPID)");
        pid = fork();
        if (pid < 0)
            setup_failed("fork");
        if (pid > 0) {
            if (waitpid(pid, &status, 0) < 0)
                setup_failed("waitpid");
            return WIFEXITED(status) ? WEXITSTATUS(status) : 4;
        }
    }
    if (!strncmp(name, "verdict_", 8))
        install_marker(name);
    return -1;
}

int main(int argc, char **argv)
{
    const struct probe_set set = {
        audit_userns, sizeof(audit_userns) / sizeof(audit_userns[0]),
        audit_root, sizeof(audit_root) / sizeof(audit_root[0]),
        audit_probe, audit_prepare, "audit",
    };
    return probe_main(argc, argv, &set);
}
"""

EPERM, ENOSYS, EAFNOSUPPORT = errno.EPERM, errno.ENOSYS, errno.EAFNOSUPPORT
ALLOWED = None

#: What heel's filter answers each probe.
EXPECTED = {
    "clone_newpid": EPERM, "clone_newipc": EPERM, "clone_newuts": EPERM, "clone_newcgroup": EPERM,
    "setpriority_process_other_with_nosched": EPERM, "ioprio_set_process_other_with_nosched": EPERM,
    "setpriority_user_self_with_nosched": EPERM, "ioprio_set_user_self_with_nosched": EPERM,
    "ioctl_tiocsserial": EPERM, "socket_raw_tcp_with_inet": EPERM,
    "socket_unix_dgram_with_seqpacket": EPERM, "socketpair_inet": EPERM,
    "passpidfd_with_nobind": EPERM, "passpidfd_with_nobind_nolinger": EPERM, "passpidfd": ALLOWED,
    "sendmsg_fastopen_arg3_zero_with_inet_nofastopen": EPERM,
    "mknod_block_device": EPERM,
    # verdicts: the marker alone answers MARK; heel's filter, installed over it, its own errno
    "verdict_nr_470": ENOSYS, "verdict_nr_1000": ENOSYS, "verdict_nr_0x3fffffff": ENOSYS,
    "verdict_nr_469": ALLOWED,  # file_setattr, the last number heel knows: let through
    "verdict_getpid": ALLOWED,  # the neighbour: a call heel lets through reaches the marker
    "verdict_socket_vsock": EAFNOSUPPORT, "verdict_socket_vsock_with_unix_inet_route": EAFNOSUPPORT,
}


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> str:
    if not os.path.isdir(CSRC):
        pytest.skip("csrc/ is not here (an installed copy of the tests): nothing to build the filter from")
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("heel's filter knows x86_64 and aarch64 only")
    return compile_c(AUDIT, tmp_path_factory.mktemp("audit"), "seccomp_audit", "-O1", "-Wall",
                     "-I", CSRC, "-I", TESTS, os.path.join(CSRC, "seccomp.c"))


def test_every_audit_probe_has_an_expectation(audit):
    import subprocess

    listing = subprocess.run([audit, "--list"], capture_output=True, text=True, check=True, timeout=10)
    assert {line.split()[0] for line in listing.stdout.splitlines()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_filter_alone_refuses_what_the_audit_found(audit, name, tmp_path):
    root = name == "mknod_block_device"
    if root and os.geteuid() != 0:
        pytest.skip(f"{name} needs a capability of the host's root for its control")
    os.chmod(tmp_path, 0o755)
    control = _run(audit, name, "control", str(tmp_path))
    filtered = _run(audit, name, "filtered", str(tmp_path))
    expected = EXPECTED[name]
    if name.startswith("verdict_"):
        # The marker is reached without heel's filter: a MARK under it is heel's "allow".
        assert control == MARK, (name, control)
        assert filtered == (MARK if expected is ALLOWED else expected), (name, filtered)
        return
    if expected is ALLOWED:
        assert filtered == control, (name, os.strerror(filtered) if filtered else "ok")
        return
    assert filtered == expected, (name, os.strerror(filtered) if filtered else "ok")
    assert control != expected, f"the kernel here answers {name} with {errno.errorcode[control]} itself"


# ---- the same, as an attack from a real sandbox ---------------------------------------------

#: TIOCSSERIAL (reconfigure the serial port behind a terminal) on a pty of
#: the command's own, next to TIOCGSERIAL, its reading twin, which the filter
#: lets through: a pty has no serial port, and the kernel answers both with
#: ENOTTY.  Prints "NAME errno" for each.
TIOCSSERIAL_ATTACK = r"""
import fcntl, os, termios
master, slave = os.openpty()
for name in ("TIOCGSERIAL", "TIOCSSERIAL"):
    try:
        fcntl.ioctl(slave, getattr(termios, name), bytes(256))
        print(name, 0)
    except OSError as exc:
        print(name, exc.errno)
"""


async def test_tiocsserial_is_refused_in_a_sandbox():
    import heel

    from helpers import explain, host_py, py

    # The control: on the host the kernel answers both with ENOTTY, not EPERM.
    host = host_py(TIOCSSERIAL_ATTACK)
    assert host.returncode == 0, explain(host)
    assert host.stdout.split() == [b"TIOCGSERIAL", b"%d" % errno.ENOTTY, b"TIOCSSERIAL", b"%d" % errno.ENOTTY], \
        explain(host)
    async with heel.Sandbox(heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT)) as sb:
        out = await py(sb, TIOCSSERIAL_ATTACK)
    assert out.returncode == 0, explain(out)
    assert out.stdout.split() == [b"TIOCGSERIAL", b"%d" % errno.ENOTTY, b"TIOCSSERIAL", b"%d" % EPERM], explain(out)
