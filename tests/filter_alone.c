/*
 * filter_alone.c - heel's seccomp filter, on its own, against the kernel.
 *
 * tests/test_seccomp_filter.py builds this with csrc/seccomp.c and runs each
 * probe twice in the same setting: once without the filter (the control)
 * and once with it.  The setting gives the probe as much as the kernel
 * grants an unprivileged user: a user namespace of its own in which it is
 * root with every capability, with a mount, network and IPC namespace that
 * namespace owns.  So an operation the control can do, and the filtered run
 * cannot, is refused by the filter and by nothing else: not by a missing
 * capability, a sysctl or the rest of heel's sandbox.  (Inside a real
 * sandbox heel also drops every capability, so most of these would fail
 * there even without the filter: tests/test_security_kernel.py attacks from
 * there; this file shows that each entry of the filter does its part.)
 *
 * The probes in mode "root" need a capability of the initial user
 * namespace (CAP_SYS_BOOT, CAP_BPF, ...), so they run on the host's root
 * itself, without namespaces, and only when the tests run as root.  Their
 * arguments are invalid on purpose where a call could change the host:
 * the kernel checks the capability first and refuses the arguments after
 * (EINVAL, ENOENT, EBADF), which is the control's answer; the filter
 * answers EPERM before the kernel sees anything.
 *
 *   filter_alone --list                          "NAME MODE" per probe
 *   filter_alone NAME filtered|control DIR       run one probe in DIR
 *
 * It prints "NAME ok" or "NAME errno N" (exit 0), or "NAME setup errno N"
 * (exit 2) when what the probe needs could not be prepared.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/netlink.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "heel.h"
#include "syscalls.h"

/* Every probe, and where it runs; probe() below has the code of each. */
static const char *const probes_userns[] = {
    "mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
    "open_tree", "open_tree_attr", "mount_setattr", "listmount", "statmount", "quotactl_fd", "chroot", "unshare_user", "unshare_mount", "setns",
    "clone_newuser", "clone_newns", "clone_newnet", "clone_plain", "clone3_plain", "clone3_newuser",
    "ptrace_traceme", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "prlimit_other", "prlimit_other_high_pointer", "prlimit_self",
    "sched_setaffinity_other", "sched_setaffinity_other_with_nosched", "sched_setscheduler_other_with_nosched",
    "sched_setparam_other_with_nosched", "sched_setattr_other_with_nosched", "sched_setaffinity_self_with_nosched",
    "setpriority_user", "setpriority_user_with_nosched", "ioprio_set_user_with_nosched",
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "personality_no_aslr", "personality_query", "name_to_handle_at", "lsm_set_self_attr",
    "clock_settime", "settimeofday", "adjtimex_read", "clock_adjtime_read",
#ifdef SYS_iopl
    "iopl_zero", "ioperm_off", "modify_ldt_read",
#endif
#ifdef __x86_64__
    "x32_getpid",
#endif
#ifdef SYS_uselib
    "uselib", "sysctl", "nfsservctl", "lookup_dcookie", /* gone from the kernel, refused all the same */
#endif
    "chmod_setuid", "fchmod_setuid", "fchmodat_setgid", "fchmodat2_setuid",
#ifdef SYS_creat
    "creat_setuid", "open_creat_setuid",
#endif
    "openat_creat_setuid", "openat_tmpfile_setgid", "openat2_creat", "mknod_setuid", "mknodat_setgid",
    "chmod_sticky", "fcntl_setlease",
    "ioctl_tiocsti", "ioctl_tiocsti_high_bits", "ioctl_tiocsetd", "ioctl_tioclinux", "ioctl_tiocgwinsz",
    "socket_packet", "socket_raw_icmp", "socket_udp", "socket_udp6", "socket_tcp",
    "socket_tcp_with_inet", "socket_tcp_nonblock_with_inet", "socket_udp_with_inet", "socket_sctp_with_inet",
    "socket_netlink_route", "socket_netlink_route_with_route", "socket_netlink_audit_with_route",
    "socket_unix", "socket_unix_with_unix", "socket_unix_seqpacket_with_seqpacket",
    "socket_unix_stream_with_seqpacket", "socketpair_dgram", "socketpair_stream",
    "bind_with_unix_nobind", "bind_with_unix", "listen_with_unix_nolisten", "passcred_with_nobind", "passcred",
    "so_linger", "so_linger_with_nobind", "so_linger_with_nolinger", "so_linger_with_nobind_nolinger",
    "passcred_with_nolinger", "passcred_with_nobind_nolinger", "so_keepalive_with_nolinger",
    "passrights", "passrights_with_nolinger", "passrights_with_nobind_nolinger",
    "sendto_fastopen_with_inet_nofastopen", "sendmsg_fastopen_with_inet_nofastopen",
    "sendmmsg_fastopen_with_inet_nofastopen",
};

static const char *const probes_root[] = {
    "bpf", "perf_event_open", "fanotify_init", "mknod_char_device", "reboot_bad_magic",
    "kexec_load_bad_flags", "kexec_file_load_bad_flags", "vhangup_without_terminal", "init_module_empty", "finit_module_bad_fd", "delete_module_absent",
    "acct_absent", "swapon_absent", "swapoff_absent", "quotactl_absent", "syslog_size", "open_by_handle_at",
};

#ifndef __NR_fchmodat2
#define __NR_fchmodat2 452
#endif
#ifndef __NR_listmount
#define __NR_listmount 458
#endif
#ifndef __NR_statmount
#define __NR_statmount 457
#endif
#ifndef __NR_open_tree_attr
#define __NR_open_tree_attr 467
#endif
#ifndef __NR_lsm_set_self_attr
#define __NR_lsm_set_self_attr 460
#endif
#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)
#endif
#define ASK(call) report(call)

static const char *probe_name;

static int report(long rc)
{
    if (rc < 0)
        printf("%s errno %d\n", probe_name, errno);
    else
        printf("%s ok\n", probe_name);
    return 0;
}

static void setup_failed(const char *what)
{
    printf("%s setup errno %d (%s)\n", probe_name, errno, what);
    exit(2);
}

/* A child that sleeps until killed: a target of the same uid. */
static pid_t sleeper(void)
{
    pid_t pid = fork();

    if (pid < 0)
        setup_failed("fork");
    if (pid == 0) {
        pause();
        _exit(0);
    }
    return pid;
}

static void end(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* A raw clone() that returns in the child like fork (a zero stack: the
 * child goes on with the parent's copy).  The argument order of the
 * pointers differs by arch; zeros are zeros in both. */
static int try_clone(unsigned long flags)
{
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);

    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    return report(pid);
}

struct clone_args_v0 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static int try_clone3(uint64_t flags)
{
    struct clone_args_v0 args = {.flags = flags, .exit_signal = SIGCHLD};
    long pid = syscall(__NR_clone3, &args, sizeof(args));

    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    return report(pid);
}

static int ptrace_traceme_errno(void)
{
    return ptrace(PTRACE_TRACEME, 0, NULL, NULL) < 0 ? errno : 0;
}

static int make_file(const char *name)
{
    int fd = open(name, O_CREAT | O_RDWR | O_TRUNC, 0644);

    if (fd < 0)
        setup_failed(name);
    return fd;
}

static int socket_probe(int family, int type, int protocol)
{
    int fd = socket(family, type, protocol);

    report(fd);
    if (fd >= 0)
        close(fd);
    return 0;
}

/* A unix stream socket with an abstract name of its own, for bind/listen. */
static int unix_socket(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);

    if (fd < 0)
        setup_failed("socket(AF_UNIX)");
    return fd;
}

static int bind_abstract(int fd)
{
    struct sockaddr_un {
        sa_family_t family;
        char path[108];
    } addr = {AF_UNIX, {0}};
    int n = snprintf(addr.path + 1, sizeof(addr.path) - 1, "heel-filter-alone-%d", (int)getpid());

    return bind(fd, (struct sockaddr *)&addr, (socklen_t)(sizeof(sa_family_t) + 1 + n));
}

/* A pty whose slave is our controlling terminal (the kernel lets a
 * process push input into its own terminal only). */
static int own_terminal(void)
{
    int master = posix_openpt(O_RDWR | O_NOCTTY), slave;

    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
        setup_failed("posix_openpt");
    if (setsid() < 0 && errno != EPERM) /* EPERM: a session leader already */
        setup_failed("setsid");
    slave = open(ptsname(master), O_RDWR);
    if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
        setup_failed("the pty's slave");
    return slave;
}

static int tcp_sendto_fastopen(int how)
{
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(9), .sin_addr = {htonl(INADDR_LOOPBACK)}};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    char byte = 'x';
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov, .msg_iovlen = 1};
    struct mmsghdr mmsg = {.msg_hdr = msg};
    long rc;

    if (fd < 0)
        setup_failed("socket(AF_INET)");
    if (how == 0)
        rc = sendto(fd, &byte, 1, MSG_FASTOPEN, (struct sockaddr *)&to, sizeof(to));
    else if (how == 1)
        rc = sendmsg(fd, &msg, MSG_FASTOPEN);
    else
        rc = sendmmsg(fd, &mmsg, 1, MSG_FASTOPEN);
    return report(rc);
}

static int set_mode_probe(int which)
{
    int fd = make_file("f");
    long rc;

    switch (which) {
    case 0: rc = chmod("f", 04755); break;
    case 1: rc = fchmod(fd, 04755); break;
    case 2: rc = fchmodat(AT_FDCWD, "f", 02755, 0); break;
    case 3: rc = syscall(__NR_fchmodat2, AT_FDCWD, "f", 04755, 0); break;
    default: rc = -1; errno = EINVAL;
    }
    close(fd);
    return report(rc);
}

static int create_probe(int which)
{
    struct open_how {
        uint64_t flags, mode, resolve;
    } how = {O_CREAT | O_WRONLY, 04755, 0};
    long rc;

    unlink("g");
    switch (which) {
#ifdef SYS_creat
    case 0: rc = syscall(SYS_creat, "g", 04755); break;
#endif
#ifdef SYS_open
    case 1: rc = syscall(SYS_open, "g", O_CREAT | O_WRONLY, 04755); break;
#endif
    case 2: rc = syscall(SYS_openat, AT_FDCWD, "g", O_CREAT | O_WRONLY, 04755); break;
    case 3: rc = syscall(SYS_openat, AT_FDCWD, ".", O_TMPFILE | O_WRONLY, 02755); break;
    case 4: rc = syscall(__NR_openat2, AT_FDCWD, "g", &how, sizeof(how)); break;
    case 5: rc = mknod("g", S_IFREG | 04755, 0); break;
    case 6: rc = mknodat(AT_FDCWD, "g", S_IFREG | 02755, 0); break;
    default: rc = -1; errno = ENOSYS;
    }
    return report(rc);
}

static int prlimit_probe(int high_word_only)
{
    pid_t child = sleeper();
    struct rlimit *limit = &(struct rlimit){0, 0};

    if (high_word_only) {
        /* A pointer whose low 32 bits are 0: the filter must read both halves. */
        void *at = mmap((void *)0x300000000UL, 4096, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (at != (void *)0x300000000UL)
            setup_failed("mmap at 0x300000000");
        limit = at;
    }
    getrlimit(RLIMIT_NOFILE, limit);
    report(syscall(SYS_prlimit64, child, RLIMIT_NOFILE, limit, NULL));
    end(child);
    return 0;
}

static int sched_probe(int which)
{
    pid_t child = sleeper();
    cpu_set_t cpus;
    struct sched_param param = {0};
    uint32_t attr[14] = {56}; /* struct sched_attr, size 56, SCHED_OTHER */
    long rc;

    sched_getaffinity(0, sizeof(cpus), &cpus);
    switch (which) {
    case 0: rc = sched_setaffinity(child, sizeof(cpus), &cpus); break;
    case 1: rc = sched_setscheduler(child, SCHED_OTHER, &param); break;
    case 2: rc = sched_setparam(child, &param); break;
    default: rc = syscall(SYS_sched_setattr, child, attr, 0); break;
    }
    report(rc);
    end(child);
    return 0;
}

static int process_vm_probe(int write)
{
    static char secret[32] = "heel-filter-alone";
    char local[32];
    pid_t child = sleeper();
    struct iovec liov = {local, sizeof(local)}, riov = {secret, sizeof(secret)};

    report(write ? syscall(SYS_process_vm_writev, child, &riov, 1, &riov, 1, 0)
                 : syscall(SYS_process_vm_readv, child, &liov, 1, &riov, 1, 0));
    end(child);
    return 0;
}

static int probe(const char *name)
{
    char buffer[256] = {0};

    /* Mounts and namespaces */
    if (!strcmp(name, "mount")) {
        mkdir("mnt", 0755);
        return ASK(mount("none", "mnt", "tmpfs", 0, NULL));
    }
    if (!strcmp(name, "umount2"))
        return ASK(umount2("/heel-no-such-mount", 0));
    if (!strcmp(name, "pivot_root"))
        return ASK(syscall(SYS_pivot_root, ".", "."));
    if (!strcmp(name, "fsopen"))
        return ASK(syscall(__NR_fsopen, "tmpfs", 0));
    if (!strcmp(name, "fsconfig"))
        return ASK(syscall(__NR_fsconfig, -1, 6, NULL, NULL, 0));
    if (!strcmp(name, "fsmount"))
        return ASK(syscall(__NR_fsmount, -1, 0, 0));
    if (!strcmp(name, "fspick"))
        return ASK(syscall(__NR_fspick, AT_FDCWD, "", 0));
    if (!strcmp(name, "move_mount"))
        return ASK(syscall(__NR_move_mount, -1, "", -1, "", 0));
    if (!strcmp(name, "open_tree"))
        return ASK(syscall(__NR_open_tree, AT_FDCWD, "/", 1 /* OPEN_TREE_CLONE */));
    if (!strcmp(name, "mount_setattr"))
        return ASK(syscall(__NR_mount_setattr, -1, "", 0, NULL, 0));
    if (!strcmp(name, "listmount"))
        return ASK(syscall(__NR_listmount, NULL, NULL, 0, 0));
    if (!strcmp(name, "statmount"))
        return ASK(syscall(__NR_statmount, NULL, NULL, 0, 0));
    if (!strcmp(name, "open_tree_attr"))
        return ASK(syscall(__NR_open_tree_attr, -1, "", 0, NULL, 0));
    if (!strcmp(name, "quotactl_fd"))
        return ASK(syscall(__NR_quotactl_fd, -1, 0, 0, NULL));
    if (!strcmp(name, "chroot"))
        return ASK(chroot("."));
    if (!strcmp(name, "unshare_user"))
        return ASK(unshare(CLONE_NEWUSER));
    if (!strcmp(name, "unshare_mount"))
        return ASK(unshare(CLONE_NEWNS));
    if (!strcmp(name, "setns")) {
        int fd = open("/proc/self/ns/net", O_RDONLY);
        if (fd < 0)
            setup_failed("/proc/self/ns/net");
        return ASK(setns(fd, CLONE_NEWNET));
    }
    if (!strcmp(name, "clone_newuser"))
        return try_clone(CLONE_NEWUSER);
    if (!strcmp(name, "clone_newns"))
        return try_clone(CLONE_NEWNS);
    if (!strcmp(name, "clone_newnet"))
        return try_clone(CLONE_NEWNET);
    if (!strcmp(name, "clone_plain"))
        return try_clone(0);
    if (!strcmp(name, "clone3_plain"))
        return try_clone3(0);
    if (!strcmp(name, "clone3_newuser"))
        return try_clone3(CLONE_NEWUSER);

    /* Other processes */
    if (!strcmp(name, "ptrace_traceme")) {
        pid_t pid = fork();
        int status;
        if (pid == 0)
            _exit(ptrace_traceme_errno());
        waitpid(pid, &status, 0);
        errno = WEXITSTATUS(status);
        return ASK(errno ? -1 : 0);
    }
    if (!strcmp(name, "process_vm_readv"))
        return process_vm_probe(0);
    if (!strcmp(name, "process_vm_writev"))
        return process_vm_probe(1);
    if (!strcmp(name, "pidfd_getfd")) {
        int pidfd = (int)syscall(__NR_pidfd_open, getpid(), 0);
        if (pidfd < 0)
            setup_failed("pidfd_open");
        return ASK(syscall(__NR_pidfd_getfd, pidfd, 0, 0));
    }
    if (!strcmp(name, "prlimit_other"))
        return prlimit_probe(0);
    if (!strcmp(name, "prlimit_other_high_pointer"))
        return prlimit_probe(1);
    if (!strcmp(name, "prlimit_self")) {
        struct rlimit limit;
        getrlimit(RLIMIT_NOFILE, &limit);
        return ASK(syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, &limit, NULL));
    }
    if (!strncmp(name, "sched_setaffinity_other", strlen("sched_setaffinity_other")))
        return sched_probe(0);
    if (!strcmp(name, "sched_setscheduler_other_with_nosched"))
        return sched_probe(1);
    if (!strcmp(name, "sched_setparam_other_with_nosched"))
        return sched_probe(2);
    if (!strcmp(name, "sched_setattr_other_with_nosched"))
        return sched_probe(3);
    if (!strcmp(name, "sched_setaffinity_self_with_nosched")) {
        cpu_set_t cpus;
        sched_getaffinity(0, sizeof(cpus), &cpus);
        return ASK(sched_setaffinity(0, sizeof(cpus), &cpus));
    }
    /* A uid with no process: no process is changed. */
    if (!strncmp(name, "setpriority_user", strlen("setpriority_user")))
        return ASK(setpriority(PRIO_USER, 54321, 0));
    if (!strcmp(name, "ioprio_set_user_with_nosched"))
        return ASK(syscall(SYS_ioprio_set, 3 /* IOPRIO_WHO_USER */, 54321, 0));

    /* Kernel facilities */
    if (!strcmp(name, "keyctl"))
        return ASK(syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -2 /* process keyring */, 1));
    if (!strcmp(name, "add_key"))
        return ASK(syscall(SYS_add_key, "user", "heel-filter-alone", "x", 1, -2));
    if (!strcmp(name, "request_key"))
        return ASK(syscall(SYS_request_key, "user", "heel-no-such-key", NULL, 0));
    if (!strcmp(name, "io_uring_setup")) {
        char params[120] = {0};
        return ASK(syscall(__NR_io_uring_setup, 8, params));
    }
    if (!strcmp(name, "io_uring_enter"))
        return ASK(syscall(__NR_io_uring_enter, -1, 0, 0, 0, NULL, 0));
    if (!strcmp(name, "io_uring_register"))
        return ASK(syscall(__NR_io_uring_register, -1, 0, NULL, 0));
    if (!strcmp(name, "userfaultfd"))
        return ASK(syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */));
    if (!strcmp(name, "personality_no_aslr"))
        return ASK(syscall(SYS_personality, 0x0040000 /* ADDR_NO_RANDOMIZE */));
    if (!strcmp(name, "personality_query"))
        return ASK(syscall(SYS_personality, 0xffffffffUL));
    if (!strcmp(name, "name_to_handle_at")) {
        int mount_id;
        *(unsigned int *)buffer = 128; /* handle_bytes */
        return ASK(syscall(SYS_name_to_handle_at, AT_FDCWD, ".", buffer, &mount_id, 0));
    }
    if (!strcmp(name, "lsm_set_self_attr"))
        return ASK(syscall(__NR_lsm_set_self_attr, 100, NULL, 0, 0));
    if (!strcmp(name, "clock_settime")) { /* the monotonic clock is never set */
        struct timespec ts = {1, 0};
        return ASK(syscall(SYS_clock_settime, CLOCK_MONOTONIC, &ts));
    }
    if (!strcmp(name, "settimeofday")) { /* microseconds out of range: nothing is set */
        long tv[2] = {1, 5000000};
        return ASK(syscall(SYS_settimeofday, tv, NULL));
    }
    if (!strcmp(name, "adjtimex_read")) {
        char tx[256] = {0}; /* modes 0: only reads */
        return ASK(syscall(SYS_adjtimex, tx));
    }
    if (!strcmp(name, "clock_adjtime_read")) {
        char tx[256] = {0};
        return ASK(syscall(SYS_clock_adjtime, CLOCK_REALTIME, tx));
    }
#ifdef SYS_iopl
    if (!strcmp(name, "iopl_zero"))
        return ASK(syscall(SYS_iopl, 0));
    if (!strcmp(name, "ioperm_off"))
        return ASK(syscall(SYS_ioperm, 0, 1, 0));
    if (!strcmp(name, "modify_ldt_read"))
        return ASK(syscall(SYS_modify_ldt, 0, buffer, sizeof(buffer)));
#endif
#ifdef __x86_64__
    if (!strcmp(name, "x32_getpid"))
        return ASK(syscall(0x40000000 | SYS_getpid));
#endif
#ifdef SYS_uselib
    if (!strcmp(name, "uselib"))
        return ASK(syscall(SYS_uselib, "/heel-no-such-file"));
    if (!strcmp(name, "sysctl"))
        return ASK(syscall(SYS__sysctl, NULL));
    if (!strcmp(name, "nfsservctl"))
        return ASK(syscall(SYS_nfsservctl, 0, NULL, NULL));
    if (!strcmp(name, "lookup_dcookie"))
        return ASK(syscall(SYS_lookup_dcookie, 0, NULL, 0));
#endif

    /* Files: no setuid or setgid bit, no device node */
    if (!strcmp(name, "chmod_setuid"))
        return set_mode_probe(0);
    if (!strcmp(name, "fchmod_setuid"))
        return set_mode_probe(1);
    if (!strcmp(name, "fchmodat_setgid"))
        return set_mode_probe(2);
    if (!strcmp(name, "fchmodat2_setuid"))
        return set_mode_probe(3);
    if (!strcmp(name, "creat_setuid"))
        return create_probe(0);
    if (!strcmp(name, "open_creat_setuid"))
        return create_probe(1);
    if (!strcmp(name, "openat_creat_setuid"))
        return create_probe(2);
    if (!strcmp(name, "openat_tmpfile_setgid"))
        return create_probe(3);
    if (!strcmp(name, "openat2_creat"))
        return create_probe(4);
    if (!strcmp(name, "mknod_setuid"))
        return create_probe(5);
    if (!strcmp(name, "mknodat_setgid"))
        return create_probe(6);
    if (!strcmp(name, "chmod_sticky")) {
        close(make_file("f"));
        return ASK(chmod("f", 01755));
    }
    if (!strcmp(name, "fcntl_setlease")) {
        int fd;
        close(make_file("f"));
        fd = open("f", O_RDONLY);
        return ASK(fcntl(fd, 1024 /* F_SETLEASE */, F_RDLCK));
    }

    /* Terminals */
    if (!strcmp(name, "ioctl_tiocsti"))
        return ASK(ioctl(own_terminal(), TIOCSTI, "x"));
    if (!strcmp(name, "ioctl_tiocsti_high_bits"))
        return ASK(syscall(SYS_ioctl, own_terminal(), (1UL << 32) | TIOCSTI, "x"));
    if (!strcmp(name, "ioctl_tiocsetd")) {
        int ldisc = 0; /* N_TTY, what it has */
        return ASK(ioctl(own_terminal(), TIOCSETD, &ldisc));
    }
    if (!strcmp(name, "ioctl_tioclinux")) {
        char subcode = 12; /* TIOCL_GETSHIFTSTATE */
        return ASK(ioctl(own_terminal(), TIOCLINUX, &subcode));
    }
    if (!strcmp(name, "ioctl_tiocgwinsz")) {
        struct winsize size;
        return ASK(ioctl(own_terminal(), TIOCGWINSZ, &size));
    }

    /* Sockets: the filter is built with the options the name says */
    if (!strcmp(name, "socket_packet"))
        return socket_probe(AF_PACKET, SOCK_RAW, 0);
    if (!strcmp(name, "socket_raw_icmp"))
        return socket_probe(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    if (!strcmp(name, "socket_udp"))
        return socket_probe(AF_INET, SOCK_DGRAM, 0);
    if (!strcmp(name, "socket_udp6"))
        return socket_probe(AF_INET6, SOCK_DGRAM, 0);
    if (!strcmp(name, "socket_tcp"))
        return socket_probe(AF_INET, SOCK_STREAM, 0);
    if (!strcmp(name, "socket_tcp_with_inet") || !strcmp(name, "socket_tcp_nonblock_with_inet"))
        return socket_probe(AF_INET6, SOCK_STREAM | (strstr(name, "nonblock") ? SOCK_NONBLOCK : 0), 0);
    if (!strcmp(name, "socket_udp_with_inet"))
        return socket_probe(AF_INET, SOCK_DGRAM, 0);
    if (!strcmp(name, "socket_sctp_with_inet"))
        return socket_probe(AF_INET, SOCK_STREAM, IPPROTO_SCTP);
    if (!strcmp(name, "socket_netlink_route"))
        return socket_probe(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    if (!strcmp(name, "socket_netlink_route_with_route"))
        return socket_probe(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    if (!strcmp(name, "socket_netlink_audit_with_route"))
        return socket_probe(AF_NETLINK, SOCK_RAW, NETLINK_AUDIT);
    if (!strcmp(name, "socket_unix"))
        return socket_probe(AF_UNIX, SOCK_STREAM, 0);
    if (!strcmp(name, "socket_unix_with_unix"))
        return socket_probe(AF_UNIX, SOCK_STREAM, 0);
    if (!strcmp(name, "socket_unix_seqpacket_with_seqpacket"))
        return socket_probe(AF_UNIX, SOCK_SEQPACKET, 0);
    if (!strcmp(name, "socket_unix_stream_with_seqpacket"))
        return socket_probe(AF_UNIX, SOCK_STREAM, 0);
    if (!strcmp(name, "socketpair_dgram") || !strcmp(name, "socketpair_stream")) {
        int pair[2];
        return ASK(socketpair(AF_UNIX, strstr(name, "dgram") ? SOCK_DGRAM : SOCK_STREAM, 0, pair));
    }
    if (!strcmp(name, "bind_with_unix_nobind"))
        return ASK(bind_abstract(unix_socket()));
    if (!strcmp(name, "bind_with_unix")) /* the neighbour: bind allowed by these options */
        return ASK(bind_abstract(unix_socket()));
    if (!strcmp(name, "listen_with_unix_nolisten")) {
        int fd = unix_socket();
        if (bind_abstract(fd) < 0)
            setup_failed("bind");
        return ASK(listen(fd, 1));
    }
    if (!strncmp(name, "passcred", 8)) {
        int pair[2], one = 1;
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0)
            setup_failed("socketpair");
        return ASK(setsockopt(pair[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)));
    }
    if (!strncmp(name, "so_linger", 9) || !strcmp(name, "so_keepalive_with_nolinger")) {
        /* SO_LINGER on any socket is refused with IPC (r26); SO_KEEPALIVE, its neighbour, is not */
        int pair[2], one = 1;
        struct linger linger = {1, 1};
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0)
            setup_failed("socketpair");
        if (!strcmp(name, "so_keepalive_with_nolinger"))
            return ASK(setsockopt(pair[0], SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)));
        return ASK(setsockopt(pair[0], SOL_SOCKET, SO_LINGER, &linger, sizeof(linger)));
    }
    if (!strncmp(name, "passrights", 10)) {
        /* SO_PASSRIGHTS (83, Linux 6.16) is refused with IPC (r29): the sandbox
         * may keep its own fd of a connection's host end and turn it back on */
        int pair[2], one = 1;
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0)
            setup_failed("socketpair");
        return ASK(setsockopt(pair[0], SOL_SOCKET, 83, &one, sizeof(one)));
    }
    if (!strcmp(name, "sendto_fastopen_with_inet_nofastopen"))
        return tcp_sendto_fastopen(0);
    if (!strcmp(name, "sendmsg_fastopen_with_inet_nofastopen"))
        return tcp_sendto_fastopen(1);
    if (!strcmp(name, "sendmmsg_fastopen_with_inet_nofastopen"))
        return tcp_sendto_fastopen(2);

    /* Only where the host's root runs the tests (see the top) */
    if (!strcmp(name, "bpf")) {
        uint32_t attr[32] = {2 /* BPF_MAP_TYPE_ARRAY */, 4, 4, 1};
        return ASK(syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, attr, sizeof(attr)));
    }
    if (!strcmp(name, "perf_event_open")) {
        uint64_t attr[16] = {0};
        ((uint32_t *)attr)[0] = 1;   /* PERF_TYPE_SOFTWARE */
        ((uint32_t *)attr)[1] = 128; /* size */
        attr[5] = 1 << 5 | 1 << 6;   /* exclude_kernel, exclude_hv */
        return ASK(syscall(SYS_perf_event_open, attr, 0, -1, -1, 0));
    }
    if (!strcmp(name, "fanotify_init"))
        return ASK(syscall(SYS_fanotify_init, 0, O_RDONLY));
    if (!strcmp(name, "mknod_char_device")) {
        report(mknod("dev", S_IFCHR | 0600, makedev(1, 3))); /* /dev/null's numbers */
        unlink("dev");
        return 0;
    }
    if (!strcmp(name, "reboot_bad_magic"))
        return ASK(syscall(SYS_reboot, 0, 0, 0, NULL));
    if (!strcmp(name, "kexec_load_bad_flags"))
        return ASK(syscall(SYS_kexec_load, 0, 1000, NULL, 0x100));
    if (!strcmp(name, "kexec_file_load_bad_flags"))
        return ASK(syscall(SYS_kexec_file_load, -1, -1, 0, NULL, 0x100));
    if (!strcmp(name, "vhangup_without_terminal")) {
        /* It hangs up the caller's controlling terminal: have none. */
        int tty = open("/dev/tty", O_RDWR);
        if (tty >= 0 || errno != ENXIO)
            setup_failed("a controlling terminal, which vhangup would hang up");
        return ASK(syscall(SYS_vhangup));
    }
    if (!strcmp(name, "init_module_empty"))
        return ASK(syscall(SYS_init_module, NULL, 0, ""));
    if (!strcmp(name, "finit_module_bad_fd"))
        return ASK(syscall(SYS_finit_module, -1, "", 0));
    if (!strcmp(name, "delete_module_absent"))
        return ASK(syscall(SYS_delete_module, "heel_no_such_module", O_NONBLOCK));
    if (!strcmp(name, "acct_absent"))
        return ASK(syscall(SYS_acct, "/heel-no-such-file"));
    if (!strcmp(name, "swapon_absent"))
        return ASK(syscall(SYS_swapon, "/heel-no-such-file", 0));
    if (!strcmp(name, "swapoff_absent"))
        return ASK(syscall(SYS_swapoff, "/heel-no-such-file"));
    if (!strcmp(name, "quotactl_absent"))
        return ASK(syscall(SYS_quotactl, (0x800004 << 8) /* Q_GETFMT, USRQUOTA */, "/heel-no-such-file", 0, buffer));
    if (!strcmp(name, "syslog_size"))
        return ASK(syscall(SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0));
    if (!strcmp(name, "open_by_handle_at"))
        return ASK(syscall(SYS_open_by_handle_at, -1, buffer, O_RDONLY));
    printf("%s unknown\n", name);
    return 3;
}

/* The filter's options, from the words after "_with_" in a probe's name. */
static void options_for(const char *name, struct heel_seccomp_opts *opts)
{
    const char *with = strstr(name, "_with_");
    char words[128];

    memset(opts, 0, sizeof(*opts));
    if (with == NULL)
        return;
    snprintf(words, sizeof(words), "%s", with + strlen("_with_"));
    for (char *save = NULL, *word = strtok_r(words, "_", &save); word; word = strtok_r(NULL, "_", &save)) {
        if (!strcmp(word, "unix"))
            opts->allow_unix_sockets = 1;
        else if (!strcmp(word, "seqpacket"))
            opts->allow_unix_seqpacket = 1;
        else if (!strcmp(word, "inet"))
            opts->allow_inet_stream = 1;
        else if (!strcmp(word, "route"))
            opts->allow_netlink_route = 1;
        else if (!strcmp(word, "nolisten"))
            opts->deny_listen = 1;
        else if (!strcmp(word, "nobind"))
            opts->deny_bind = 1;
        else if (!strcmp(word, "nofastopen"))
            opts->deny_fastopen = 1;
        else if (!strcmp(word, "nosched"))
            opts->deny_foreign_sched = 1;
        else if (!strcmp(word, "nolinger"))
            opts->deny_linger = 1;
    }
}

static int listed(const char *name, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(list[i], name))
            return 1;
    return 0;
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);

    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        setup_failed(path);
    close(fd);
}

/* Root with every capability, in namespaces of its own. */
static void enter_namespaces(void)
{
    char map[64];
    uid_t uid = getuid();
    gid_t gid = getgid();

    if (unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC) < 0)
        setup_failed("unshare");
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof(map), "0 %u 1", (unsigned)uid);
    write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof(map), "0 %u 1", (unsigned)gid);
    write_file("/proc/self/gid_map", map);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        setup_failed("private mounts");
}

static void install_filter(const char *name)
{
    static struct heel_bpf_insn code[1024];
    struct heel_seccomp_opts opts;
    struct sock_fprog prog;
    int n;

    options_for(name, &opts);
    n = heel_seccomp_build(&opts, code, 1024);
    if (n <= 0) {
        errno = -n;
        setup_failed("heel_seccomp_build");
    }
    prog.len = (unsigned short)n;
    prog.filter = (struct sock_filter *)code;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        setup_failed("seccomp");
}

/* The probes a program runs: its lists, the probe itself, and an optional
 * step before the filters (after no_new_privs) that returns -1 to go on,
 * or the status to exit with (a parent that forked the probe). */
struct probe_set {
    const char *const *userns;
    size_t n_userns;
    const char *const *root;
    size_t n_root;
    int (*run)(const char *name);
    int (*prepare)(const char *name);
    const char *program;
};

static int probe_main(int argc, char **argv, const struct probe_set *set)
{
    int root, status;

    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 2 && !strcmp(argv[1], "--list")) {
        for (size_t i = 0; i < set->n_userns; i++)
            printf("%s userns\n", set->userns[i]);
        for (size_t i = 0; i < set->n_root; i++)
            printf("%s root\n", set->root[i]);
        return 0;
    }
    if (argc != 4 || (strcmp(argv[2], "filtered") && strcmp(argv[2], "control"))) {
        fprintf(stderr, "usage: %s --list | NAME filtered|control DIR\n", set->program);
        return 64;
    }
    probe_name = argv[1];
    root = listed(probe_name, set->root, set->n_root);
    if (!root && !listed(probe_name, set->userns, set->n_userns)) {
        printf("%s unknown\n", probe_name);
        return 3;
    }
    if (chdir(argv[3]) < 0)
        setup_failed("chdir");
    if (!root)
        enter_namespaces();
    /* Both runs alike but for the filter (no_new_privs lets an
     * unprivileged process install one). */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        setup_failed("no_new_privs");
    if (set->prepare != NULL && (status = set->prepare(probe_name)) >= 0)
        return status;
    if (!strcmp(argv[2], "filtered"))
        install_filter(probe_name);
    return set->run(probe_name);
}

int main(int argc, char **argv)
{
    const struct probe_set set = {
        probes_userns, sizeof(probes_userns) / sizeof(probes_userns[0]),
        probes_root, sizeof(probes_root) / sizeof(probes_root[0]),
        probe, NULL, "filter_alone",
    };
    return probe_main(argc, argv, &set);
}
