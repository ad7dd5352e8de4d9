/*
 * seccomp.c - the classic BPF seccomp filter every sandboxed process runs under.
 *
 * The program, over struct seccomp_data (A is the BPF accumulator):
 *
 *   prologue   A = arch;  A != native arch   -> ERRNO(EPERM)   refuses int 0x80 next to the 64-bit table
 *              A = nr;    A has the x32 bit  -> ERRNO(EPERM)   x86-64 only
 *   search     a balanced binary search ("A >= k?" splits) that takes the
 *              syscall number to its exit
 *   exits      RET ALLOW                                       every syscall not listed
 *              RET ERRNO(EPERM)                                each denied syscall
 *              RET ERRNO(ENOSYS)                               clone3, openat2, and every
 *                                                              number past the last one
 *                                                              heel knows
 *              clone, personality, mknod, mknodat, ioctl, socket, socketpair,
 *              bind, listen, sendto, sendmsg, sendmmsg, prlimit64,
 *              setpriority, ioprio_set, sched_setaffinity, sched_setscheduler,
 *              sched_setparam, sched_setattr,
 *              chmod, fchmod, fchmodat, fchmodat2, creat, open, openat:
 *              one argument check each (syscalls with the same check share
 *              its code), which loads its arguments and ends in a return on
 *              every path
 *
 * The search: the listed syscalls, sorted, cut the number line into
 * segments, each with one exit: a listed number is a segment of its own,
 * the allowed numbers between two listed ones another, and adjacent numbers
 * with the same exit share one (io_uring_setup ... fspick are nine denied
 * numbers in a row).  The search splits the segments in halves until one
 * is left and jumps to its exit; with ~85 segments that is 7 comparisons,
 * and n segments take n - 1 instructions.
 *
 * Why a search and not a chain of "A == nr?" tests: since Linux 5.11 the
 * kernel runs the filter once per syscall number when it is installed, to
 * learn which numbers it always allows and skip it for those afterwards.
 * That costs (number of syscalls) x (length of the path), and every
 * sandboxed command pays it: a chain walks ~60 tests for an allowed
 * syscall, the search 7.  The syscalls that still run the filter (the
 * listed ones) get the same saving; open and openat are among them since
 * their mode is checked, about a dozen instructions on each call.
 *
 * Jumps: a conditional jump's jt/jf is an 8-bit forward offset.  Every jump
 * here goes forward by construction (a split's halves and the exits come
 * after it); the longest reaches 149 instructions on x86-64 today (the
 * split before open, to open's check, the last one).  Past 255, build fails
 * with -E2BIG rather than emit a wrong offset; a BPF_JA (32-bit offset) hop
 * would be the fix then.
 *
 * Arguments are compared by their low 32 bits only: the kernel itself reads
 * no more for these int/unsigned int/umode_t parameters (clone's flags go
 * through lower_32_bits()), so upper bits cannot smuggle a value past a check.
 */
/* S_IFMT and friends are XSI names that a strict -std=c99 would hide. */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <netinet/in.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/netlink.h>
#include <linux/sched.h>
#include <linux/seccomp.h>

#include "heel.h"
#include "syscalls.h"

#ifndef AUDIT_ARCH_X86_64
#define AUDIT_ARCH_X86_64 0xc000003eu
#endif
#ifndef AUDIT_ARCH_AARCH64
#define AUDIT_ARCH_AARCH64 0xc00000b7u
#endif

/* Both supported ABIs are little-endian: the low word of an argument comes
 * first.  aarch64_be has no AUDIT_ARCH of its own and stays unsupported. */
#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__) && defined(__AARCH64EL__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#else
#define NATIVE_ARCH 0u
#endif

/* The kernel's __O_TMPFILE bit alone: glibc's __O_TMPFILE also carries
 * O_DIRECTORY, which by itself creates nothing.  The same value on both arches. */
#define KERNEL_O_TMPFILE 020000000u

/* The mode bits no sandboxed process may set on a file: see setuid_mode_check(). */
#define SETID_BITS (S_ISUID | S_ISGID)

#ifdef __x86_64__
#ifndef __X32_SYSCALL_BIT
#define __X32_SYSCALL_BIT 0x40000000u
#endif
#endif

#define ALLOW SECCOMP_RET_ALLOW
#define FAIL(e) (SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))

#define DATA_NR offsetof(struct seccomp_data, nr)
#define DATA_ARCH offsetof(struct seccomp_data, arch)
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#define ARG_HI(i) (ARG_LO(i) + 4)

/* sendto/sendmsg's flag that connects a TCP socket as it sends
 * (include/linux/socket.h); not every libc names it. */
#define HEEL_MSG_FASTOPEN 0x20000000u
/* SO_PASSPIDFD (Linux 6.5), and F_SETLEASE, which glibc shows only with
 * _GNU_SOURCE: the kernel's numbers, whatever the headers have. */
#define HEEL_SO_PASSPIDFD 76u
/* SO_PASSRIGHTS (Linux 6.16): the host turns it off on each IPC connection
 * (heel.ipc._refuse_fds); the sandbox must not turn it back on. */
#define HEEL_SO_PASSRIGHTS 83u
#ifndef F_SETLEASE
#define F_SETLEASE 1024
#endif

/* The namespaces a sandboxed process must not create: each would hand it
 * capabilities over a fresh view of the system (CLONE_NEWTIME is left out
 * because 0x80 is part of clone()'s exit-signal byte). */
#define CLONE_NEW_ANY (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | \
                       CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)

/* The kernel surface that sandboxed code has no business touching: tracing
 * other processes, mounts and namespaces (and listing the host's mounts with
 * listmount/statmount), modules and kexec, bpf and perf, fanotify (it watches
 * whole mounts and file systems), keyrings, io_uring (it bypasses seccomp for
 * the operations it queues), the x86 LDT (a long history of kernel bugs,
 * needed by little besides Wine and 16-bit code), and host-wide settings such
 * as time, swap, quotas and reboot.  kcmp stays allowed: it compares the
 * kernel objects of two processes we may already ptrace-read, which inside
 * our pid namespace are our own. */
static const uint32_t denied_syscalls[] = {
    __NR_ptrace,
    __NR_process_vm_readv,
    __NR_process_vm_writev,
    __NR_mount,
    __NR_umount2,
#ifdef __NR_umount
    __NR_umount,
#endif
    __NR_pivot_root,
    __NR_fsopen,
    __NR_fsconfig,
    __NR_fsmount,
    __NR_fspick,
    __NR_move_mount,
    __NR_open_tree,
    __NR_open_tree_attr,
    __NR_mount_setattr,
    __NR_listmount,
    __NR_statmount,
    __NR_unshare,
    __NR_setns,
    __NR_kexec_load,
#ifdef __NR_kexec_file_load
    __NR_kexec_file_load,
#endif
    __NR_init_module,
    __NR_finit_module,
    __NR_delete_module,
    __NR_bpf,
    __NR_perf_event_open,
    __NR_userfaultfd,
    __NR_fanotify_init,
    __NR_keyctl,
    __NR_add_key,
    __NR_request_key,
    __NR_io_uring_setup,
    __NR_io_uring_enter,
    __NR_io_uring_register,
    __NR_acct,
    __NR_swapon,
    __NR_swapoff,
    __NR_reboot,
    __NR_quotactl,
    __NR_quotactl_fd,
    __NR_open_by_handle_at,
    __NR_name_to_handle_at,
#ifdef __NR_iopl
    __NR_iopl,
#endif
#ifdef __NR_ioperm
    __NR_ioperm,
#endif
#ifdef __NR_modify_ldt
    __NR_modify_ldt,
#endif
    __NR_settimeofday,
    __NR_clock_settime,
    __NR_clock_adjtime,
    __NR_adjtimex,
#ifdef __NR_stime
    __NR_stime,
#endif
    __NR_syslog,
#ifdef __NR_lookup_dcookie
    __NR_lookup_dcookie,
#endif
    __NR_vhangup,
#ifdef __NR_uselib
    __NR_uselib,
#endif
#ifdef __NR_nfsservctl
    __NR_nfsservctl,
#endif
#ifdef __NR__sysctl
    __NR__sysctl,
#endif
    __NR_chroot,
    __NR_pidfd_getfd,
    __NR_lsm_set_self_attr, /* what a write to /proc/self/attr does, which Landlock refuses */
};

/* ---- a tiny assembler ------------------------------------------------ */

struct bpf_asm {
    struct heel_bpf_insn *out;
    int cap;
    int len;  /* instructions emitted; keeps counting past cap so the caller learns the size */
    int err;  /* a jump too long for its offset field */
};

/* A list of constants as the (array, count) pair the helpers take. */
#define ONE_OF(...) (const uint32_t[]){__VA_ARGS__}, \
    (int)(sizeof((const uint32_t[]){__VA_ARGS__}) / sizeof(uint32_t))

#define COUNT(array) ((int)(sizeof(array) / sizeof((array)[0])))

static int emit(struct bpf_asm *a, uint16_t code, uint8_t jt, uint8_t jf, uint32_t k)
{
    if (a->len < a->cap)
        a->out[a->len] = (struct heel_bpf_insn){code, jt, jf, k};
    return a->len++;
}

/* The jt/jf offset that takes the jump at `from` to `to`: forward, 8 bits. */
static uint8_t reach(struct bpf_asm *a, int from, int to)
{
    int skip = to - from - 1;

    if (skip < 0 || skip > 255) {
        a->err = -E2BIG;
        return 0;
    }
    return (uint8_t)skip;
}

static void load(struct bpf_asm *a, uint32_t offset)
{
    emit(a, BPF_LD | BPF_W | BPF_ABS, 0, 0, offset);
}

static void ret(struct bpf_asm *a, uint32_t action)
{
    emit(a, BPF_RET | BPF_K, 0, 0, action);
}

static void ret_if_eq(struct bpf_asm *a, uint32_t k, uint32_t action)
{
    emit(a, BPF_JMP | BPF_JEQ | BPF_K, 0, 1, k);
    ret(a, action);
}

static void ret_if_ne(struct bpf_asm *a, uint32_t k, uint32_t action)
{
    emit(a, BPF_JMP | BPF_JEQ | BPF_K, 1, 0, k);
    ret(a, action);
}

/* Return `action` when A and `mask` share a bit. */
static void ret_if_any_bit(struct bpf_asm *a, uint32_t mask, uint32_t action)
{
    emit(a, BPF_JMP | BPF_JSET | BPF_K, 0, 1, mask);
    ret(a, action);
}

/* Return `action` when A and `mask` share no bit. */
static void ret_unless_any_bit(struct bpf_asm *a, uint32_t mask, uint32_t action)
{
    emit(a, BPF_JMP | BPF_JSET | BPF_K, 1, 0, mask);
    ret(a, action);
}

/* Return `in` when A is one of ks[0..n), else `out`.  n is at most a few. */
static void ret_in(struct bpf_asm *a, const uint32_t *ks, int n, uint32_t in, uint32_t out)
{
    for (int i = 0; i < n; i++)
        emit(a, BPF_JMP | BPF_JEQ | BPF_K, (uint8_t)(n - i), 0, ks[i]);
    ret(a, out);
    ret(a, in);
}

/* Open a block entered when A is one of ks[0..n); end_if() closes it by
 * patching the last comparison's false branch to jump past the block. */
static int begin_if(struct bpf_asm *a, const uint32_t *ks, int n)
{
    for (int i = 0; i < n - 1; i++)
        emit(a, BPF_JMP | BPF_JEQ | BPF_K, (uint8_t)(n - 1 - i), 0, ks[i]);
    return emit(a, BPF_JMP | BPF_JEQ | BPF_K, 0, 0, ks[n - 1]);
}

static void end_if(struct bpf_asm *a, int at)
{
    uint8_t skip = reach(a, at, a->len);

    if (at < a->cap)
        a->out[at].jf = skip;
}

/* ---- the argument checks ------------------------------------------------
 *
 * Each is entered with A = nr, loads what it needs and ends in a return on
 * every path.
 */

/* clone: no new namespaces.  clone3 has an exit of its own, see heel_seccomp_build(). */
static void clone_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    load(a, ARG_LO(0));
    ret_if_any_bit(a, CLONE_NEW_ANY, FAIL(EPERM));
    ret(a, ALLOW);
}

/* Only PER_LINUX (0) and the query (0xffffffff): other personalities
 * turn off ASLR (ADDR_NO_RANDOMIZE) or change how the kernel treats us. */
static void personality_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    load(a, ARG_LO(0));
    ret_in(a, ONE_OF(0, 0xffffffffu), ALLOW, FAIL(EPERM));
}

/* No setuid or setgid bit on any file, for every user.  When heel runs as
 * root the sandbox's writable places are idmapped, so what it creates is
 * root's on disk: a copy of /bin/sh made setuid there is a root shell for
 * whoever on the host runs it later.  Refusing the bits outright is cheaper
 * than telling that case apart, and the same for everyone.  The sticky bit
 * grants nothing and stays allowed. */
static void setuid_mode_check(struct bpf_asm *a, int mode_arg)
{
    load(a, ARG_LO(mode_arg));
    ret_if_any_bit(a, SETID_BITS, FAIL(EPERM));
    ret(a, ALLOW);
}

/* chmod(path, mode), fchmod(fd, mode), creat(path, mode). */
static void mode_arg1_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    setuid_mode_check(a, 1);
}

/* fchmodat(dirfd, path, mode) and fchmodat2(dirfd, path, mode, flags). */
static void mode_arg2_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    setuid_mode_check(a, 2);
}

/* open and openat use their mode only when they create a file (O_CREAT, or
 * O_TMPFILE's own bit); otherwise the kernel ignores it, and so must we:
 * open(path, O_RDONLY) leaves whatever was in the register there. */
static void open_mode_check(struct bpf_asm *a, int flags_arg)
{
    load(a, ARG_LO(flags_arg));
    ret_unless_any_bit(a, O_CREAT | KERNEL_O_TMPFILE, ALLOW);
    setuid_mode_check(a, flags_arg + 1);
}

#ifdef __NR_open
static void open_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    open_mode_check(a, 1);  /* open(path, flags, mode) */
}
#endif

static void openat_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    open_mode_check(a, 2);  /* openat(dirfd, path, flags, mode) */
}

/* mknod/mknodat: regular files, fifos and sockets are fine, though without
 * setuid/setgid bits (a regular file made setuid, as with chmod above);
 * device nodes would open the host's hardware if the file system let them
 * be used. */
static void mknod_mode_check(struct bpf_asm *a, int mode_arg)
{
    load(a, ARG_LO(mode_arg));
    ret_if_any_bit(a, SETID_BITS, FAIL(EPERM));
    emit(a, BPF_ALU | BPF_AND | BPF_K, 0, 0, S_IFMT);
    ret_in(a, ONE_OF(S_IFCHR, S_IFBLK), FAIL(EPERM), ALLOW);
}

#ifdef __NR_mknod
static void mknod_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    mknod_mode_check(a, 1);  /* mknod(path, mode, dev) */
}
#endif

static void mknodat_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    mknod_mode_check(a, 2);  /* mknodat(dirfd, path, mode, dev) */
}

/* TIOCSTI pushes input into a terminal, TIOCLINUX reads and pastes the
 * console: both reach past the sandbox through an inherited tty.  TIOCSETD
 * changes the line discipline of that tty (the host's terminal, left broken
 * or turned into something else, and a path into rarely used ldisc code),
 * TIOCSSERIAL reconfigures the serial port behind it.  The kernel reads cmd
 * as unsigned int, hence the low word only. */
static void ioctl_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    load(a, ARG_LO(1));
    ret_in(a, ONE_OF(TIOCSTI, TIOCLINUX, TIOCSETD, TIOCSSERIAL), FAIL(EPERM), ALLOW);
}

/* socket(domain, type, protocol).  A family the options enable but whose
 * type or protocol is refused, or a known family the options leave off, gets
 * EPERM: a policy refusal the user should see as one.  Every other family
 * gets EAFNOSUPPORT, what a kernel without it says, so probing code (IPv6,
 * AF_PACKET, AF_VSOCK, ...) takes its usual fallback.  Stream sockets keep
 * to TCP (protocol 0 or IPPROTO_TCP): SCTP and MPTCP also speak SOCK_STREAM,
 * and Landlock's port rules cover TCP only. */
static void socket_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    load(a, ARG_LO(0));
    if (opts->allow_unix_sockets || !opts->allow_unix_seqpacket) {
        ret_if_eq(a, AF_UNIX, opts->allow_unix_sockets ? ALLOW : FAIL(EPERM));
    } else {
        /* Where a GPU is granted: CUDA listens on an abstract seqpacket
         * socket of its own (in the sandbox's network namespace) and fails
         * to start without one.  Stream and datagram sockets, what host
         * daemons listen on, stay refused. */
        int unix_ = begin_if(a, ONE_OF(AF_UNIX));

        load(a, ARG_LO(1));
        emit(a, BPF_ALU | BPF_AND | BPF_K, 0, 0, 0xf);
        ret_in(a, ONE_OF(SOCK_SEQPACKET), ALLOW, FAIL(EPERM));
        end_if(a, unix_);
    }
    if (opts->allow_inet_stream) {
        int inet = begin_if(a, ONE_OF(AF_INET, AF_INET6));

        load(a, ARG_LO(1));
        /* The low nibble is the type; SOCK_NONBLOCK and SOCK_CLOEXEC sit above it. */
        emit(a, BPF_ALU | BPF_AND | BPF_K, 0, 0, 0xf);
        ret_if_ne(a, SOCK_STREAM, FAIL(EPERM));
        load(a, ARG_LO(2));
        ret_in(a, ONE_OF(0, IPPROTO_TCP), ALLOW, FAIL(EPERM));
        end_if(a, inet);
    } else {
        ret_if_eq(a, AF_INET, FAIL(EPERM));
        ret_if_eq(a, AF_INET6, FAIL(EPERM));
    }
    if (opts->allow_netlink_route) {
        int netlink = begin_if(a, ONE_OF(AF_NETLINK));

        load(a, ARG_LO(2));
        ret_in(a, ONE_OF(NETLINK_ROUTE), ALLOW, FAIL(EPERM));
        end_if(a, netlink);
    } else {
        ret_if_eq(a, AF_NETLINK, FAIL(EPERM));
    }
    ret(a, FAIL(EAFNOSUPPORT));
}

/* Without a network namespace, a TCP socket that calls listen() without
 * bind() gets an ephemeral port on every interface of the host: Landlock's
 * bind rule does not see that implicit bind, nor accept().  Anyone could then
 * connect in, and the data would never pass the proxy.  So there, listen()
 * is refused outright (unix sockets included: seccomp cannot tell them
 * apart). */
static void listen_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    ret(a, opts->deny_listen ? FAIL(EPERM) : ALLOW);
}

/* Without a network namespace, and without socket(AF_UNIX), the sandbox's
 * only sockets are socketpairs (and TCP clients, which Landlock already
 * keeps from binding).  None of them needs a name, and bind() would take
 * an abstract one in the host's namespace: a name that a host service
 * (an X server, D-Bus) could then no longer bind. */
static void bind_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    ret(a, opts->deny_bind ? FAIL(EPERM) : ALLOW);
}

/* Without a network namespace Landlock's port rule is what keeps TCP to the
 * proxy's port, and it sees connect() only: sendto() or sendmsg() with
 * MSG_FASTOPEN connects a TCP socket without passing that hook, to any
 * address and port.  There, the flag is refused (sendto and sendmmsg carry
 * their flags in argument 3, sendmsg in argument 2).  With a namespace the
 * check is left out: the loopback holds nothing but the proxy. */
static void fastopen_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts, int flags_arg)
{
    if (!opts->deny_fastopen) {
        ret(a, ALLOW);
        return;
    }
    load(a, ARG_LO(flags_arg));
    ret_if_any_bit(a, HEEL_MSG_FASTOPEN, FAIL(EPERM));
    ret(a, ALLOW);
}

static void flags_arg3_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    fastopen_check(a, opts, 3);
}

static void flags_arg2_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    fastopen_check(a, opts, 2);
}

/* prlimit64(pid, resource, new, old): another process's limits only read
 * (new == NULL).  Setting them needs no more than the same uid, and the
 * sandbox's processes share theirs with heel-init and each command's init:
 * a command that lowered their RLIMIT_NOFILE would keep them from opening
 * what they need to find and kill its processes.  pid 0, the caller itself,
 * is what setrlimit() uses.  The pointer is checked in both halves: one
 * whose low word is 0 is a valid address. */
static void prlimit_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    load(a, ARG_LO(0));
    ret_if_eq(a, 0, ALLOW);
    load(a, ARG_LO(2));
    ret_if_ne(a, 0, FAIL(EPERM));
    load(a, ARG_HI(2));
    ret_if_ne(a, 0, FAIL(EPERM));
    ret(a, ALLOW);
}

/* The priority and scheduling of another process need no more than the
 * same uid, and Landlock's signal scope does not cover them.  In a pid
 * namespace they reach the sandbox's own processes only (PRIO_USER too: the
 * kernel skips tasks the caller's namespace cannot see).  Without one they
 * would reach every process of the user's on the host, heel's own Python
 * among them (nice 19, SCHED_IDLE, one CPU, idle I/O): then only the
 * caller itself (pid 0) and its own process group (who 0).  taskset -p and
 * renice by pid, and pthread_setaffinity_np() (which names a thread by its
 * tid), fail there with EPERM. */
static void own_sched_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    if (!opts->deny_foreign_sched) {
        ret(a, ALLOW);
        return;
    }
    load(a, ARG_LO(0));
    ret_if_eq(a, 0, ALLOW);
    ret(a, FAIL(EPERM));
}

/* setpriority(which, who, prio) and ioprio_set(which, who, ioprio): who 0
 * (the caller, or its own process group) and a `which` that is not the
 * whole uid (``process`` and ``pgrp`` are the two values allowed). */
static void own_prio_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts, uint32_t process,
                           uint32_t pgrp)
{
    if (!opts->deny_foreign_sched) {
        ret(a, ALLOW);
        return;
    }
    load(a, ARG_LO(1));
    ret_if_ne(a, 0, FAIL(EPERM));
    load(a, ARG_LO(0));
    ret_in(a, ONE_OF(process, pgrp), ALLOW, FAIL(EPERM));
}

/* PRIO_PROCESS 0 or PRIO_PGRP 1, never PRIO_USER 2. */
static void setpriority_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    own_prio_check(a, opts, 0, 1);
}

/* IOPRIO_WHO_PROCESS 1 or IOPRIO_WHO_PGRP 2, never IOPRIO_WHO_USER 3. */
static void ioprio_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    own_prio_check(a, opts, 1, 2);
}

/* A connected pair of unix stream or seqpacket sockets reaches nobody
 * outside the process tree: they cannot be connected again, and sendto()
 * on them ignores (stream: refuses) an address.  A datagram pair can do
 * both, and would reach any pathname socket of the host it can name
 * (/dev/log, a daemon's socket), socket(AF_UNIX) refused or not. */
static void socketpair_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    load(a, ARG_LO(0));
    ret_if_ne(a, AF_UNIX, FAIL(EPERM));
    load(a, ARG_LO(1));
    /* The low nibble is the type; SOCK_NONBLOCK and SOCK_CLOEXEC sit above it. */
    emit(a, BPF_ALU | BPF_AND | BPF_K, 0, 0, 0xf);
    ret_in(a, ONE_OF(SOCK_STREAM, SOCK_SEQPACKET), ALLOW, FAIL(EPERM));
}

/* fcntl(fd, F_SETLEASE, ...).  A lease makes whoever opens the file next
 * (for writing; for a write lease, at all) wait for its holder, up to
 * fs.lease-break-time (45 s) each time, and the holder may take it again.
 * It takes no more than owning the file, opened read-only: a non-root
 * user's sandbox would hold up the user's host processes on any of the
 * user's files it may read.  Sandboxed code has no use for one.  (Locks,
 * flock() and fcntl()'s, are not refused: programs need them, and seccomp
 * cannot see whether a file is the sandbox's.)  The kernel reads cmd as
 * unsigned int, hence the low word only. */
static void fcntl_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    (void)opts;
    load(a, ARG_LO(1));
    ret_in(a, ONE_OF(F_SETLEASE), FAIL(EPERM), ALLOW);
}

/* setsockopt(fd, SOL_SOCKET, SO_LINGER, ...) where the sandbox has IPC: the
 * last close() of a TCP socket with a linger time waits, up to that time
 * (for ever, in effect), until its FIN is acknowledged, which a peer whose
 * receive buffer is full never does.  Through IPC the sandbox can make the
 * host do that last close: it hands fds over the broker, and the host closes
 * what is not an IPC connection (and the kernel drops, in the host's thread,
 * what a message carries past the host's four) in the thread that runs trio,
 * which then stands still, every sandbox's timeout and the proxy with it.
 * Inside a network namespace the sandbox has such a peer of its own (a
 * listen()ed ephemeral port, reached with MSG_FASTOPEN); with a permissive
 * policy, a server of its choosing that stops reading.  seccomp cannot read
 * the struct linger behind the pointer, so the option is refused whatever it
 * holds (getsockopt works).  Without IPC no fd of the sandbox's reaches the
 * host, and programs that reset connections with a zero linger keep working.
 *
 * And, where the sandbox has IPC, SO_PASSRIGHTS: the host turns it off on
 * the end of each connection the sandbox passes, so that the kernel refuses
 * fds sent along it, and then reads the connection in the thread that runs
 * trio, where a recv would drop (and a last close free) whatever file came
 * along.  Passing an fd copies it: the sandbox may keep that same socket,
 * and through its own fd it would turn the option back on.
 *
 * And SO_PASSCRED or SO_PASSPIDFD where bind() is refused.  A unix
 * socket that passes credentials is given an abstract name of the kernel's
 * choosing ("autobind") as soon as it sends, a socketpair's ends included.
 * Where bind() is refused (no network namespace) that name would be taken
 * in the host's namespace, the same as a bind(): some 1.8 KB of kernel
 * memory each, counted by no limit of the sandbox's, out of a pool of 2^20
 * names for the whole host. */
static void setsockopt_check(struct bpf_asm *a, const struct heel_seccomp_opts *opts)
{
    if (!opts->deny_bind && !opts->deny_linger) {
        ret(a, ALLOW);
        return;
    }
    load(a, ARG_LO(1));
    ret_if_ne(a, SOL_SOCKET, ALLOW);
    load(a, ARG_LO(2));
    if (!opts->deny_bind)
        ret_in(a, ONE_OF(SO_LINGER, HEEL_SO_PASSRIGHTS), FAIL(EPERM), ALLOW);
    else if (!opts->deny_linger)
        ret_in(a, ONE_OF(SO_PASSCRED, HEEL_SO_PASSPIDFD), FAIL(EPERM), ALLOW);
    else
        ret_in(a, ONE_OF(SO_LINGER, HEEL_SO_PASSRIGHTS, SO_PASSCRED, HEEL_SO_PASSPIDFD), FAIL(EPERM), ALLOW);
}

/* The syscalls whose arguments decide, and the check each one gets.
 * Syscalls that name the same check share one copy of its code (and, when
 * their numbers are adjacent, as chmod and fchmod are on x86-64, one
 * segment of the search). */
static const struct arg_check {
    uint32_t nr;
    void (*emit)(struct bpf_asm *a, const struct heel_seccomp_opts *opts);
} arg_checks[] = {
    {__NR_clone, clone_check},
    {__NR_personality, personality_check},
#ifdef __NR_mknod
    {__NR_mknod, mknod_check},
#endif
    {__NR_mknodat, mknodat_check},
    {__NR_ioctl, ioctl_check},
    {__NR_socket, socket_check},
    {__NR_socketpair, socketpair_check},
    {__NR_bind, bind_check},
    {__NR_setsockopt, setsockopt_check},
    {__NR_fcntl, fcntl_check},
#ifdef __NR_fcntl64
    {__NR_fcntl64, fcntl_check},
#endif
    {__NR_listen, listen_check},
    {__NR_sendto, flags_arg3_check},
    {__NR_sendmsg, flags_arg2_check},
    {__NR_sendmmsg, flags_arg3_check},
    {__NR_prlimit64, prlimit_check},
    {__NR_setpriority, setpriority_check},
    {__NR_ioprio_set, ioprio_check},
    {__NR_sched_setaffinity, own_sched_check},
    {__NR_sched_setscheduler, own_sched_check},
    {__NR_sched_setparam, own_sched_check},
    {__NR_sched_setattr, own_sched_check},
#ifdef __NR_chmod
    {__NR_chmod, mode_arg1_check},
#endif
    {__NR_fchmod, mode_arg1_check},
#ifdef __NR_creat
    {__NR_creat, mode_arg1_check},
#endif
    {__NR_fchmodat, mode_arg2_check},
    {__NR_fchmodat2, mode_arg2_check},
#ifdef __NR_open
    {__NR_open, open_check},
#endif
    {__NR_openat, openat_check},
};

/* The first entry of arg_checks[] with the same check as entry i: the one
 * whose code entry i uses. */
static int first_alike(int i)
{
    int j = 0;

    while (arg_checks[j].emit != arg_checks[i].emit)
        j++;
    return j;
}

/* ---- the search ---------------------------------------------------------- */

/* Where a syscall number leads.  The exits follow the search in this order:
 * three returns, then the code of each argument check (one copy per check,
 * see first_alike()). */
enum {
    EXIT_ALLOW,
    EXIT_EPERM,
    EXIT_ENOSYS,
    EXIT_CHECK,   /* EXIT_CHECK + i: arg_checks[i] */
    EXIT_COUNT = EXIT_CHECK + COUNT(arg_checks),
};

/* A syscall the policy names, and where it leads. */
struct listed {
    uint32_t nr;
    int exit;
};

#define MAX_LISTED (2 + COUNT(denied_syscalls) + COUNT(arg_checks))

/* Add nr to list[0..n), which stays sorted by number; returns the new count.
 * A number already there keeps the exit it has: the caller adds the denials
 * first, so a number listed twice by mistake is refused, never let through. */
static int add_listed(struct listed *list, int n, uint32_t nr, int exit)
{
    int i = n;

    while (i > 0 && list[i - 1].nr > nr)
        i--;
    if (i > 0 && list[i - 1].nr == nr)
        return n;
    for (int j = n; j > i; j--)
        list[j] = list[j - 1];
    list[i] = (struct listed){nr, exit};
    return n + 1;
}

/* The syscall numbers, 0 to 2^32 - 1, cut into segments: segment i runs
 * from seg[i].from up to the next segment's start (or to the end) and
 * leads to seg[i].exit.  Neighbours have different exits, so a run of
 * adjacent numbers with one exit (io_uring_setup ... fspick on both
 * arches) is a single segment. */
struct segment {
    uint32_t from;
    int exit;
};

/* Each listed number adds at most two segments: its own, and the allowed
 * gap after it; the unknown numbers past the last known one make one more. */
#define MAX_SEGMENTS (2 + 2 * MAX_LISTED)

/* Let the numbers from `from` on lead to `exit`, in seg[0..n) (n >= 1).
 * Calls come in rising order of `from`: this either starts a segment or,
 * when the last one starts at `from`, changes its exit; a segment whose exit
 * equals its neighbour's is merged into it.  Returns the new count. */
static int cut(struct segment *seg, int n, uint32_t from, int exit)
{
    struct segment *last = &seg[n - 1];

    if (last->from == from) {
        last->exit = exit;
        if (n > 1 && last[-1].exit == exit)
            n--;
    } else if (last->exit != exit) {
        seg[n++] = (struct segment){from, exit};
    }
    return n;
}

/* Emit the search that takes A to the exit of its segment among seg[0..n),
 * given the exits' positions.  Every split is "A >= first number of the upper
 * half": the lower half's code comes right after the split, the upper half's
 * after that, and a half that is one segment is a jump straight to its exit.
 * n segments take n - 1 splits; the path is ceil(log2(n)) of them. */
static int search(struct bpf_asm *a, const struct segment *seg, int n, const int *exit_at)
{
    if (n == 1)
        return exit_at[seg[0].exit];

    int lower = n / 2;
    int at = emit(a, BPF_JMP | BPF_JGE | BPF_K, 0, 0, seg[lower].from);
    int below = search(a, seg, lower, exit_at);
    int above = search(a, seg + lower, n - lower, exit_at);
    uint8_t jt = reach(a, at, above), jf = reach(a, at, below);

    if (at < a->cap) {
        a->out[at].jt = jt;
        a->out[at].jf = jf;
    }
    return at;
}

/* The length of a check's code, found by emitting it nowhere. */
static int check_len(const struct arg_check *check, const struct heel_seccomp_opts *opts)
{
    struct bpf_asm dry = {NULL, 0, 0, 0};

    check->emit(&dry, opts);
    return dry.len;
}

uint32_t heel_seccomp_arch(void)
{
    return NATIVE_ARCH;
}

int heel_seccomp_build(const struct heel_seccomp_opts *opts,
                       struct heel_bpf_insn *out, int cap)
{
    struct bpf_asm a = {out, cap < 0 ? 0 : cap, 0, 0};
    struct listed list[MAX_LISTED];
    struct segment seg[MAX_SEGMENTS] = {{0, EXIT_ALLOW}};
    int exit_at[EXIT_COUNT];
    int n_listed = 0, n_seg = 1;

    if (NATIVE_ARCH == 0)
        return -ENOTSUP;
    if (opts == NULL)
        return -EINVAL;

    /* clone3 passes its flags in memory, out of a filter's reach; ENOSYS
     * (not EPERM) is what makes glibc and others retry with clone().
     * openat2 likewise keeps its mode in a struct open_how: ENOSYS is what
     * a kernel before 5.6 says, and callers fall back to openat() (glibc's
     * open() never uses openat2), where the mode can be checked. */
    n_listed = add_listed(list, n_listed, __NR_clone3, EXIT_ENOSYS);
    n_listed = add_listed(list, n_listed, __NR_openat2, EXIT_ENOSYS);
    for (int i = 0; i < COUNT(denied_syscalls); i++)
        n_listed = add_listed(list, n_listed, denied_syscalls[i], EXIT_EPERM);
    for (int i = 0; i < COUNT(arg_checks); i++)
        n_listed = add_listed(list, n_listed, arg_checks[i].nr, EXIT_CHECK + first_alike(i));

    for (int i = 0; i < n_listed; i++) {
        if (list[i].nr > HEEL_LAST_KNOWN_SYSCALL)
            return -EFAULT;  /* a listed number past the known ones: raise the constant */
        n_seg = cut(seg, n_seg, list[i].nr, list[i].exit);
        n_seg = cut(seg, n_seg, list[i].nr + 1, EXIT_ALLOW);
    }
    /* A syscall a newer kernel adds (a mount, namespace or tracing call
     * among them) is not let through unreviewed: ENOSYS, what an older
     * kernel says, so callers fall back to the calls heel knows. */
    n_seg = cut(seg, n_seg, HEEL_LAST_KNOWN_SYSCALL + 1, EXIT_ENOSYS);

    /* A syscall number only means something within its own table. */
    load(&a, DATA_ARCH);
    ret_if_ne(&a, NATIVE_ARCH, FAIL(EPERM));
    load(&a, DATA_NR);
#ifdef __x86_64__
    /* x32 syscalls carry the arch of x86-64 but a table of their own. */
    emit(&a, BPF_JMP | BPF_JGE | BPF_K, 0, 1, __X32_SYSCALL_BIT);
    ret(&a, FAIL(EPERM));
#endif

    /* The exits start after the search's n_seg - 1 splits. */
    exit_at[EXIT_ALLOW] = a.len + n_seg - 1;
    exit_at[EXIT_EPERM] = exit_at[EXIT_ALLOW] + 1;
    exit_at[EXIT_ENOSYS] = exit_at[EXIT_EPERM] + 1;
    for (int i = 0, at = exit_at[EXIT_ENOSYS] + 1; i < COUNT(arg_checks); i++) {
        if (first_alike(i) < i)
            continue;  /* never an exit: its syscall leads to the first alike */
        exit_at[EXIT_CHECK + i] = at;
        at += check_len(&arg_checks[i], opts);
    }

    search(&a, seg, n_seg, exit_at);

    /* The exits, in the order of the EXIT_ constants. */
    ret(&a, ALLOW);
    ret(&a, FAIL(EPERM));
    ret(&a, FAIL(ENOSYS));
    for (int i = 0; i < COUNT(arg_checks); i++) {
        if (first_alike(i) < i)
            continue;
        if (a.len != exit_at[EXIT_CHECK + i])
            return -EFAULT;  /* the layout above is wrong: a bug here */
        arg_checks[i].emit(&a, opts);
    }

    if (a.err)
        return a.err;
    if (a.len > a.cap)
        return -ENOSPC;
    return a.len;
}
