/*
 * heel.h - the C core of heel: Landlock rulesets, the seccomp filter, the
 * spawn trampoline and the pid-namespace init.
 *
 * Everything here is prepared by the parent (Python) and handed over as
 * plain data; the child between clone() and execve() only runs
 * async-signal-safe system calls.  heel_cdef.h repeats the declarations that
 * cffi needs, without preprocessor lines; keep the two in step.
 */
#ifndef HEEL_H
#define HEEL_H

#include <stdint.h>
#include <stddef.h>

/* Baked into the compiled module and compared with heel/_version.py at import. */
#define HEEL_NATIVE_VERSION "0.1.0"

/* ---- Landlock (landlock.c) ------------------------------------------- */

/* The Landlock ABI the running kernel speaks (1, 2, ...), or -errno when
 * Landlock is missing (-ENOSYS) or disabled at boot (-EOPNOTSUPP). */
int heel_landlock_abi(void);

/* A ruleset handling exactly these rights; the caller masks them to the ABI.
 * Returns a close-on-exec fd or -errno. */
int heel_landlock_create(uint64_t handled_fs, uint64_t handled_net, uint64_t scoped);

/* Allow `allowed` beneath `path` (a directory, or the file itself).
 * Returns 0 or -errno. */
int heel_landlock_add_path(int ruleset_fd, const char *path, uint64_t allowed);

/* Allow `allowed` (bind/connect) for TCP `port`.  Returns 0 or -errno. */
int heel_landlock_add_port(int ruleset_fd, uint64_t port, uint64_t allowed);

/* ---- seccomp (seccomp.c) --------------------------------------------- */

/* One classic BPF instruction; the same layout as struct sock_filter. */
struct heel_bpf_insn {
    uint16_t code;
    uint8_t jt;
    uint8_t jf;
    uint32_t k;
};

struct heel_seccomp_opts {
    int allow_unix_sockets;   /* socket(AF_UNIX, ...); socketpair(AF_UNIX) stream/seqpacket always */
    int allow_unix_seqpacket; /* socket(AF_UNIX, SOCK_SEQPACKET) only (implied by allow_unix_sockets) */
    int allow_inet_stream;    /* socket(AF_INET/AF_INET6, SOCK_STREAM, ...) */
    int allow_netlink_route;  /* socket(AF_NETLINK, *, NETLINK_ROUTE) */
    int deny_listen;          /* listen() refused: no network namespace holds what listens */
    int deny_bind;            /* bind() refused: no network namespace holds the names bound */
    int deny_fastopen;        /* MSG_FASTOPEN refused: no network namespace, Landlock sees connect() only */
    int deny_foreign_sched;   /* priorities and scheduling of the caller only: no pid namespace */
    int deny_linger;          /* setsockopt(SO_LINGER, SO_PASSRIGHTS) refused: the sandbox can hand sockets to the host (IPC) */
};

/* Assemble the filter into out[0..cap).  Returns the number of instructions
 * or -errno (-ENOSPC when cap is too small, -ENOTSUP on an unknown arch). */
int heel_seccomp_build(const struct heel_seccomp_opts *opts,
                       struct heel_bpf_insn *out, int cap);

/* The AUDIT_ARCH_* value the filter accepts on this build (0 if unknown). */
uint32_t heel_seccomp_arch(void);

/* ---- the spawn trampoline (spawn.c) ---------------------------------- */

/* Mount operations run in the child's new mount namespace, in order. */
enum heel_mount_kind {
    HEEL_MNT_KEEP_RW = 1,  /* clone `path` before the root turns read-only; put it back writable after */
    HEEL_MNT_READONLY = 2, /* a read-only copy of `source` (or of `path` itself) over `path` */
    HEEL_MNT_BIND = 3,     /* clone `source` (writable) and attach it at `path` */
    HEEL_MNT_PROC = 4,     /* a fresh procfs for the new pid namespace at `path` */
    HEEL_MNT_TMPFS = 5,    /* an empty private tmpfs at `path` */
    HEEL_MNT_DEVPTS = 6,   /* a private devpts instance (the sandbox sees only its own ptys) */
    HEEL_MNT_PROC_KERNEL_RO = 7, /* the kernel's entries of the procfs at `path`, read-only over themselves */
};

struct heel_mount_op {
    int kind;
    const char *source;    /* READONLY, BIND: what to clone (READONLY: `path` when NULL) */
    const char *path;      /* sources and paths are resolved without following symlinks */
    uint64_t access;       /* Landlock rights on a file system mounted fresh (PROC, TMPFS, DEVPTS) */
    int idmap;             /* KEEP_RW, BIND: map the owners through the plan's userns_fd */
};

struct heel_spawn_plan {
    int init_fd;                  /* O_PATH fd of the heel-init executable */
    char *const *argv;            /* argv of heel-init */
    char *const *envp;
    const char *cwd;
    const int *fds;               /* fds[i] becomes fd i in the child; every other fd is closed */
    int nfds;
    int report_fd;                /* index in fds of the control socket: failures go there */
    int clone_flags;              /* CLONE_NEW* namespaces to create (0: none) */
    const char *uid_map;          /* written when CLONE_NEWUSER is set */
    const char *gid_map;
    const struct heel_mount_op *mounts; /* when CLONE_NEWNS is set */
    int nmounts;
    int readonly_root;            /* make / read-only (recursively) before the KEEP_RW mounts return */
    int landlock_fd;              /* -1: none */
    int pdeathsig;                /* 0: none */
    /* When heel runs as root: a user namespace (see heel_userns_create)
     * that maps uid/gid 0 to an unprivileged id.  The child, still real root,
     * builds its mounts (writable places idmapped through it), then enters
     * it and becomes its uid/gid 0: the unprivileged id outside.  -1: none. */
    int userns_fd;
    /* With CLONE_NEWNET: bring the namespace's loopback up and listen on
     * 127.0.0.1:proxy_port there; the listening socket goes to the host
     * (HEEL_MSG_LISTENER with the fd attached, on the control socket), where
     * the proxy accepts on it.  No helper process and no socket file: only
     * the sandbox can reach it.  0: none. */
    int proxy_port;
};

/* Stages of the child's setup, reported with an errno when one fails. */
enum heel_stage {
    HEEL_STAGE_CLONE = 1,
    HEEL_STAGE_SIGNALS = 2,
    HEEL_STAGE_USERNS = 3,
    HEEL_STAGE_MOUNT = 4,
    HEEL_STAGE_FDS = 5,
    HEEL_STAGE_SETSID = 6,
    HEEL_STAGE_CHDIR = 7,
    HEEL_STAGE_RLIMIT = 8,
    HEEL_STAGE_CAPS = 9,
    HEEL_STAGE_NO_NEW_PRIVS = 10,
    HEEL_STAGE_LANDLOCK = 11,
    HEEL_STAGE_SECCOMP = 12,
    HEEL_STAGE_EXEC_INIT = 13,
    HEEL_STAGE_INIT = 14,         /* heel-init itself failed (fork, signalfd, ...) */
    HEEL_STAGE_EXEC = 15,         /* execve of the command */
    HEEL_STAGE_REQUEST = 16,      /* heel-init could not read the command request */
    HEEL_STAGE_NETWORK = 17,      /* loopback or the proxy's listening socket in the network namespace */
};

/* The most ptys a sandbox's own devpts holds (its commands' and heel's). */
#define HEEL_DEVPTS_MAX "256"

/* Messages on the control socket, native byte order, fixed size. */
enum heel_msg_kind {
    HEEL_MSG_ERROR = 1,   /* a = stage, b = errno; the command never ran */
    HEEL_MSG_STARTED = 2, /* a = the command's pid as heel-init sees it */
    HEEL_MSG_EXITED = 3,  /* a = the command's raw wait status */
    HEEL_MSG_KILL = 4,    /* host -> init: kill every process of the sandbox and exit */
    HEEL_MSG_LISTENER = 5, /* trampoline -> host: a = port; the listening socket rides along (SCM_RIGHTS) */
    HEEL_MSG_PTMX = 6,    /* trampoline -> host: an O_PATH fd of the sandbox's devpts ptmx rides along */
    HEEL_MSG_SIGNAL = 7,  /* host -> a command's init: a = a signal for the command (SIGSTOP, which
                           * would stop the init itself if sent to it) */
};

struct heel_msg {
    int32_t kind;
    int32_t a;
    int32_t b;
};

/* heel-init's argv: heel-init CTL_FD FLAGS [IPC_FD].  heel-init is the
 * sandbox's zygote: it starts every command of the sandbox (see init.c). */
#define HEEL_IPC_FD 3              /* where a command finds the IPC socket */
#define HEEL_INIT_PIDNS 1          /* pid 1 of a pid namespace: each command gets one nested */
#define HEEL_INIT_UNIX_SOCKETS 2   /* seccomp: allow socket(AF_UNIX) */
#define HEEL_INIT_INET_STREAM 4    /* seccomp: allow TCP sockets */
#define HEEL_INIT_NETLINK_ROUTE 8  /* seccomp: allow NETLINK_ROUTE sockets */
#define HEEL_INIT_SCOPE 16         /* each command in a Landlock domain of its own (scoped with ABI >= 6) */
#define HEEL_INIT_NO_LISTEN 32     /* seccomp: refuse listen() */
#define HEEL_INIT_NO_BIND 64       /* seccomp: refuse bind() */
#define HEEL_INIT_NO_FASTOPEN 128  /* seccomp: refuse sendto/sendmsg/sendmmsg with MSG_FASTOPEN */
#define HEEL_INIT_UNIX_SEQPACKET 256 /* seccomp: allow socket(AF_UNIX, SOCK_SEQPACKET) (a GPU's driver) */

/* Landlock scopes (ABI 6): abstract unix sockets and signals. */
#define HEEL_LANDLOCK_SCOPE_SIGNAL 2
#define HEEL_LANDLOCK_SCOPES 3

/* A command request, host -> heel-init, on heel-init's control socket: a
 * native-endian uint32 payload length sent with SCM_RIGHTS carrying exactly
 * four fds (stdin, stdout, stderr, the command's control socket), then the
 * payload: struct heel_request_head, nrlimits struct heel_rlimit, then the
 * NUL-terminated strings cwd, program, argv[0..nargv), env[0..nenv).
 * The reply is an int32 (the command's heel-init pid, or -errno) sent with
 * a pidfd for it (SCM_RIGHTS) on success.  Everything after that goes over
 * the command's own control socket (struct heel_msg). */
#define HEEL_REQUEST_FDS 4
#define HEEL_REQUEST_MAX (16 * 1024 * 1024)

struct heel_request_head {
    uint32_t nargv;
    uint32_t nenv;
    uint32_t nrlimits;
    uint32_t flags;     /* HEEL_REQUEST_* */
};

/* The command's stdin is a terminal (a pty that heel made for it, never a
 * host terminal): make it the controlling terminal of the command's
 * session, so that ^C, ^Z and job control work inside. */
#define HEEL_REQUEST_CTTY 1

struct heel_rlimit {
    int32_t resource;
    uint32_t reserved;
    uint64_t soft;
    uint64_t hard;
};

/* Clone a child that applies the plan and execs heel-init.  Returns the pid
 * (and a pidfd in *pidfd_out) or -errno when clone itself failed.  A later
 * failure arrives as HEEL_MSG_ERROR on the control socket. */
int heel_spawn(const struct heel_spawn_plan *plan, int *pidfd_out);

/* A user namespace with these maps (written by the caller, which needs
 * CAP_SETUID/CAP_SETGID for a map other than its own ids).  Returns an fd
 * for setns() and idmapped mounts, or -errno. */
int heel_userns_create(const char *uid_map, const char *gid_map);

/* Relay */
/* ---- the tunnel relay (relay.c) -------------------------------------- */

/* Moves the bytes of established proxy tunnels (two connected stream
 * sockets) with splice(), on one thread of its own for all tunnels. */
struct heel_relay;

/* How a tunnel ended; written whole to the completion pipe.  Byte counts
 * are what reached each destination.  error is 0 or the errno that ended
 * the tunnel (both sockets are then reset), ECANCELED when
 * heel_relay_cancel() ended it. */
struct heel_relay_done {
    uint64_t id;
    uint64_t a_to_b;
    uint64_t b_to_a;
    int32_t error;
};

/* Start the relay thread.  0 or -errno. */
int heel_relay_start(struct heel_relay **out);

/* The read end of the completion pipe (non-blocking, close-on-exec): one
 * struct heel_relay_done per ended tunnel. */
int heel_relay_notify_fd(struct heel_relay *r);

/* Relay between fd_a and fd_b until both directions reach EOF (each EOF is
 * passed on with shutdown(SHUT_WR)), an error, or a cancel.  Takes both fds
 * in every case: closes them on failure, and when the tunnel ends.  On
 * success exactly one completion with this id follows.  0 or -errno. */
int heel_relay_add(struct heel_relay *r, int fd_a, int fd_b, uint64_t id);

/* End the tunnel soon (its completion says cancelled, unless it ended
 * first).  An unknown id is ignored.  0 or -ENOMEM. */
int heel_relay_cancel(struct heel_relay *r, uint64_t id);

/* End every tunnel (no completions), join the thread, close and free all. */
void heel_relay_stop(struct heel_relay *r);

#endif
