/*
 * spawn.c - the trampoline that builds a sandbox and starts its heel-init.
 *
 * The host is a large, threaded Python process.  A plain fork() would copy
 * its page tables (tens of milliseconds for a few GiB) and run the child in
 * a copy of a multi-threaded address space.  Instead the child is created
 * with CLONE_VM|CLONE_VFORK: it borrows the parent's memory on a stack of its
 * own while the parent waits, applies the plan that Python prepared, and
 * execs heel-init, the sandbox's zygote (init.c), which starts every command.
 * Until that exec the child calls only async-signal-safe system calls,
 * touches no lock and allocates nothing.  This runs once per sandbox.
 *
 * Order of the child's steps, and why:
 *   signals    every handler back to SIG_DFL (the parent's handlers are
 *              Python's, and must not run here); all signals stay blocked.
 *   userns     uid/gid maps of the new user namespace (we hold all
 *              capabilities inside it until exec).
 *   network    in a new network namespace, loopback up and the proxy's
 *              listening socket made there and sent to the host; done
 *              while we still hold CAP_NET_ADMIN over the namespace (as
 *              real root, before entering the prepared user namespace).
 *   mounts     private propagation, then the read-only view of the file
 *              system, with the writable places put back and a fresh /proc.
 *   identity   when heel runs as root there is no new user namespace above:
 *              the child builds the mounts as real root (the writable places
 *              idmapped), then enters a prepared user namespace whose uid 0
 *              is an unprivileged id outside.
 *   chdir, setsid (no controlling terminal: no TIOCSTI into the host's tty).
 *   caps       securebits and an empty bounding set, so that even uid 0
 *              gains no capability at exec.
 *   no_new_privs, then Landlock (restrict_self needs no_new_privs): the
 *              domain every command inherits.
 *   fds        the passed fds at 0..n-1, heel-init's fd at n, every other
 *              fd closed.
 *   pdeathsig, exec.  (The seccomp filter is heel-init's first step;
 *              rlimits are each command's.)
 * A failure is reported as (stage, errno) on the control socket, then the
 * child exits with 127.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>


#include "heel.h"
#include "stack.h"
#include "syscalls.h"

/* New mount API flags, defined here for older headers. */
#define HEEL_OPEN_TREE_CLONE 1
#define HEEL_AT_RECURSIVE 0x8000
#define HEEL_AT_EMPTY_PATH 0x1000
#define HEEL_MOVE_MOUNT_F_EMPTY_PATH 0x4
#define HEEL_MOVE_MOUNT_T_EMPTY_PATH 0x40
#define HEEL_MOUNT_ATTR_RDONLY 0x1
#define HEEL_MOUNT_ATTR_IDMAP 0x00100000

#ifndef SECBIT_NOROOT
#define SECBIT_NOROOT (1 << 0)
#define SECBIT_NOROOT_LOCKED (1 << 1)
#define SECBIT_NO_SETUID_FIXUP (1 << 2)
#define SECBIT_NO_SETUID_FIXUP_LOCKED (1 << 3)
#define SECBIT_KEEP_CAPS_LOCKED (1 << 5)
#define SECBIT_NO_CAP_AMBIENT_RAISE (1 << 6)
#define SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED (1 << 7)
#endif

/* capget/capset (linux/capability.h, version 3: two 32-bit words per set). */
#define HEEL_CAP_VERSION_3 0x20080522
struct heel_cap_header {
    uint32_t version;
    int pid;
};
struct heel_cap_data {
    uint32_t effective;
    uint32_t permitted;
    uint32_t inheritable;
};

struct heel_mount_attr {
    uint64_t attr_set;
    uint64_t attr_clr;
    uint64_t propagation;
    uint64_t userns_fd;
};


/* The most mount operations and passed fds one plan may carry: the child
 * keeps an fd for each on its stack. */
#define HEEL_MAX_MOUNTS 256
#define HEEL_MAX_FDS 256
#define HEEL_CHILD_STACK (256 * 1024)

struct child_ctx {
    const struct heel_spawn_plan *plan;
};

/* ---- helpers that run in the child ----------------------------------- */

static _Noreturn void fail(int report_fd, int stage, int err)
{
    struct heel_msg msg = {HEEL_MSG_ERROR, stage, err};
    /* send() with MSG_NOSIGNAL: a host that went away must not SIGPIPE us. */
    ssize_t n;
    do {
        n = send(report_fd, &msg, sizeof(msg), MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    _exit(127);
}

static int write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = strlen(data);
    ssize_t n = write(fd, data, len);
    int err = errno;
    close(fd);
    if (n != (ssize_t)len) {
        errno = n < 0 ? err : EIO;
        return -1;
    }
    return 0;
}

/* The kernel charges some per-user quotas at every level of the user
 * namespaces above a process (its "ucounts"): what a sandbox takes is also
 * taken from the host user who made its namespace (root's daemons, when
 * root runs heel).  The maxima of the sandbox's own namespace bound its
 * share: inotify instances and watches (a review's command took all 128
 * instances of root's, and the host's inotify_init1 failed meanwhile), and
 * fanotify's groups and marks.  Written by a process in that namespace with
 * its CAP_SYS_RESOURCE: the /proc/sys/user values are those of the writer's
 * user namespace.  (Pending signals and POSIX message queues are bounded by
 * rlimits, see heel/_plan.py.) */
static const struct {
    const char *path;
    const char *value;
} userns_maxima[] = {
    {"/proc/sys/user/max_inotify_instances", "32"},
    {"/proc/sys/user/max_inotify_watches", "16384"},
    {"/proc/sys/user/max_fanotify_groups", "16"},
    {"/proc/sys/user/max_fanotify_marks", "16384"},
};

/* A file the kernel lacks (fanotify's before Linux 5.13), a read-only
 * /proc/sys (a container's) and a write a security module refuses (EACCES,
 * EPERM) are passed over, as the README says: the sandbox runs without
 * that bound rather than not at all.  Any other failure fails its start. */
static int limit_userns_quotas(void)
{
    for (size_t i = 0; i < sizeof(userns_maxima) / sizeof(userns_maxima[0]); i++) {
        if (write_file(userns_maxima[i].path, userns_maxima[i].value) < 0 && errno != ENOENT &&
            errno != EROFS && errno != EACCES && errno != EPERM)
            return -1;
    }
    return 0;
}

static int write_id_maps(const struct heel_spawn_plan *p)
{
    /* "deny" first: an unprivileged process may write gid_map only then. */
    if (write_file("/proc/self/setgroups", "deny") < 0 && errno != ENOENT)
        return -1;
    if (write_file("/proc/self/uid_map", p->uid_map) < 0)
        return -1;
    return write_file("/proc/self/gid_map", p->gid_map);
}

/* Every path the child mounts on, and every source, is resolved without
 * following symlinks: the sandbox writes inside some of these trees between
 * commands (its private /tmp holds the workdir's mount point), and a planted
 * link must not steer a mount elsewhere.  (The sources are resolved here in
 * the child, not pinned by the parent: open_tree() clones only mounts of the
 * caller's own namespace.) */
static int open_no_symlinks(const char *path)
{
    struct heel_open_how how = {
        .flags = O_PATH | O_CLOEXEC,
        .resolve = HEEL_RESOLVE_NO_SYMLINKS | HEEL_RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(__NR_openat2, AT_FDCWD, path, &how, sizeof(how));
}

static int clone_tree(const char *path)
{
    int source = open_no_symlinks(path);
    if (source < 0)
        return -1;
    int tree = (int)syscall(__NR_open_tree, source, "",
                            HEEL_AT_EMPTY_PATH | HEEL_OPEN_TREE_CLONE | HEEL_AT_RECURSIVE | O_CLOEXEC);
    close(source);
    return tree;
}

static int set_readonly(int dirfd, const char *path, unsigned flags)
{
    struct heel_mount_attr attr = {.attr_set = HEEL_MOUNT_ATTR_RDONLY};
    return (int)syscall(__NR_mount_setattr, dirfd, path, flags | HEEL_AT_RECURSIVE,
                        &attr, sizeof(attr));
}

/* Files owned by uid/gid 0 on disk appear owned by the namespace's 0 (the
 * sandbox's unprivileged id), and what the sandbox creates is stored as 0. */
static int set_idmap(int tree, int userns_fd)
{
    struct heel_mount_attr attr = {
        .attr_set = HEEL_MOUNT_ATTR_IDMAP,
        .userns_fd = (uint64_t)userns_fd,
    };
    return (int)syscall(__NR_mount_setattr, tree, "", HEEL_AT_EMPTY_PATH | HEEL_AT_RECURSIVE,
                        &attr, sizeof(attr));
}

static int attach_tree(int fd, const char *path)
{
    int target = open_no_symlinks(path);
    if (target < 0)
        return -1;
    int rc = (int)syscall(__NR_move_mount, fd, "", target, "",
                          HEEL_MOVE_MOUNT_F_EMPTY_PATH | HEEL_MOVE_MOUNT_T_EMPTY_PATH);
    close(target);
    return rc;
}

/* The procfs at `path`, mounted here a moment ago, with every entry of the
 * kernel's own in it (each directory: sys, pressure, irq, bus, ...; each
 * file with a write bit: sysrq-trigger, mtrr) bound read-only over itself,
 * so that where Landlock lets the sandbox write its /proc (a GPU driver
 * names its threads there), only the processes' own files can be written.
 * The list is read from this procfs, not from the host's view of /proc
 * (which may be a subset=pid one), and each entry is cloned alone from it,
 * without the submounts the host may have below its own (binfmt_misc).
 * getdents64 into a buffer on the stack: no allocation in the child. */
struct heel_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static int readonly_proc_entry(int dir, const char *name)
{
    struct stat st;
    int tree, target, rc;

    if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    if (!S_ISDIR(st.st_mode) && !(S_ISREG(st.st_mode) && (st.st_mode & 0222)))
        return 0;  /* links (self, mounts, net) lead to a process's own; read-only files stay so */
    tree = (int)syscall(__NR_open_tree, dir, name, HEEL_OPEN_TREE_CLONE | O_CLOEXEC | AT_SYMLINK_NOFOLLOW);
    if (tree < 0)
        return -1;
    target = openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    rc = target < 0 || set_readonly(tree, "", HEEL_AT_EMPTY_PATH) < 0 ? -1
         : (int)syscall(__NR_move_mount, tree, "", target, "",
                        HEEL_MOVE_MOUNT_F_EMPTY_PATH | HEEL_MOVE_MOUNT_T_EMPTY_PATH);
    if (target >= 0)
        close(target);
    close(tree);
    return rc < 0 ? -1 : 0;
}

static int readonly_proc_entries(const char *path)
{
    char buf[4096] __attribute__((aligned(8)));
    int dir = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    long n;

    if (dir < 0)
        return -1;
    while ((n = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
        for (long at = 0; at < n;) {
            const struct heel_dirent64 *d = (const struct heel_dirent64 *)(buf + at);
            at += d->d_reclen;
            /* ".", "..", and the processes (only digits; no entry of the
             * kernel's starts with one) */
            if (d->d_name[0] == '.' || (d->d_name[0] >= '0' && d->d_name[0] <= '9'))
                continue;
            if (readonly_proc_entry(dir, d->d_name) < 0) {
                int e = errno;
                close(dir);
                errno = e;
                return -1;
            }
        }
    }
    if (n < 0) {
        int e = errno;
        close(dir);
        errno = e;
        return -1;
    }
    close(dir);
    return 0;
}

/* A file system mounted fresh in the child (its /proc, its devpts) is
 * invisible to the parent's Landlock rules: the rule on the host's /proc is
 * on a mount root, which Landlock's walk skips ("hidden mount point"), and
 * the new inodes did not exist when the ruleset was built.  So the child
 * adds the rule for what it mounted.  The ruleset is shared, so each command
 * adds a rule or two to it; Python rebuilds the ruleset from time to time to
 * bound that growth. */
static int allow_new_mount(const struct heel_spawn_plan *p, const struct heel_mount_op *op)
{
    struct {
        uint64_t allowed_access;
        int32_t parent_fd;
    } __attribute__((packed)) rule;
    long rc;
    int fd;

    if (p->landlock_fd < 0 || !op->access)
        return 0;
    fd = open(op->path, O_PATH | O_CLOEXEC | O_DIRECTORY);
    if (fd < 0)
        return -1;
    rule.allowed_access = op->access;
    rule.parent_fd = fd;
    rc = syscall(__NR_landlock_add_rule, p->landlock_fd, 1 /* PATH_BENEATH */, &rule, 0);
    close(fd);
    return rc < 0 ? -1 : 0;
}

/* Build the mount view.  Clones of the places that stay writable are taken
 * before the root turns read-only and attached again afterwards, so they
 * keep their own (writable) flags. */
static int setup_mounts(const struct heel_spawn_plan *p)
{
    int tree[HEEL_MAX_MOUNTS];
    int i;

    if (p->nmounts > HEEL_MAX_MOUNTS) {
        errno = E2BIG;
        return -1;
    }
    /* Nothing done here may propagate back to the host's mounts. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        return -1;

    for (i = 0; i < p->nmounts; i++) {
        const struct heel_mount_op *op = &p->mounts[i];
        tree[i] = -1;
        if (op->kind == HEEL_MNT_KEEP_RW)
            tree[i] = clone_tree(op->path);
        else if (op->kind == HEEL_MNT_READONLY || op->kind == HEEL_MNT_BIND)
            tree[i] = clone_tree(op->source ? op->source : op->path);
        else
            continue;
        if (tree[i] < 0)
            return -1;
        if (op->idmap && set_idmap(tree[i], p->userns_fd) < 0)
            return -1;
    }
    if (p->readonly_root && set_readonly(AT_FDCWD, "/", 0) < 0)
        return -1;

    for (i = 0; i < p->nmounts; i++) {
        const struct heel_mount_op *op = &p->mounts[i];
        switch (op->kind) {
        case HEEL_MNT_READONLY:
            if (set_readonly(tree[i], "", HEEL_AT_EMPTY_PATH) < 0)
                return -1;
            /* attach the read-only copy over the original: */
            __attribute__((fallthrough));
        case HEEL_MNT_KEEP_RW:
        case HEEL_MNT_BIND:
            if (attach_tree(tree[i], op->path) < 0)
                return -1;
            close(tree[i]);
            break;
        case HEEL_MNT_PROC:
            /* hidepid=ptraceable: a process sees in /proc only what it could
             * ptrace, so a command sees its own processes and not those of
             * other commands or heel-init (Linux 5.8).  Not "invisible",
             * which lets every member of the mount's gid (0 by default) see
             * everything: a sandbox of root's at PERMISSIVE, or of a user
             * with the supplementary group 0, would see all the commands. */
            if (mount("proc", op->path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=ptraceable") < 0 &&
                (errno != EINVAL ||
                 mount("proc", op->path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0))
                return -1;
            if (allow_new_mount(p, op) < 0)
                return -1;
            break;
        case HEEL_MNT_PROC_KERNEL_RO:
            if (readonly_proc_entries(op->path) < 0)
                return -1;
            break;
        case HEEL_MNT_TMPFS:
            if (mount("tmpfs", op->path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
                return -1;
            if (allow_new_mount(p, op) < 0)
                return -1;
            break;
        case HEEL_MNT_DEVPTS:
            /* Since Linux 4.7 /dev/ptmx opens the instance in the pts
             * directory next to it: this one.  max: the ptys of every
             * devpts but the host's come from one pool (kernel.pty.max
             * less pty.reserve); a sandbox takes at most this many of them.
             * Read-only: ptys are still made and opened, but nothing
             * inside can chmod the ptmx (which a non-root caller's sandbox
             * owns) or its ptys. */
            if (mount("devpts", op->path, "devpts", MS_NOSUID | MS_NOEXEC,
                      "newinstance,ptmxmode=0666,mode=0620,max=" HEEL_DEVPTS_MAX) < 0 ||
                mount(NULL, op->path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC,
                      NULL) < 0)
                return -1;
            if (allow_new_mount(p, op) < 0)
                return -1;
            break;
        default:
            errno = EINVAL;
            return -1;
        }
    }
    return 0;
}

/* Send the host one message of this kind with fd attached (SCM_RIGHTS). */
static int send_fd(int report, int32_t kind, int32_t a, int fd)
{
    struct heel_msg msg = {kind, a, 0};
    struct iovec iov = {&msg, sizeof(msg)};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr mh;
    struct cmsghdr *cm;
    int rc;

    memset(&mh, 0, sizeof(mh));
    memset(&control, 0, sizeof(control));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.buf;
    mh.msg_controllen = sizeof(control.buf);
    cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    do
        rc = (int)sendmsg(report, &mh, MSG_NOSIGNAL);
    while (rc < 0 && errno == EINTR);
    return rc == (int)sizeof(msg) ? 0 : -1;
}

/* The network namespace starts with its loopback down.  Bring it up and
 * listen on 127.0.0.1:port in it, then send the listening socket to the host
 * with the HEEL_MSG_LISTENER message.  The host's proxy accepts on it: a
 * connection can only come from inside this namespace. */
static int proxy_listener(int report, int port)
{
    struct ifreq ifr;
    struct sockaddr_in addr;
    int ctl, lsock, one = 1, rc;

    ctl = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (ctl < 0)
        return -1;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, "lo", 3);
    rc = ioctl(ctl, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(ctl, SIOCSIFFLAGS, &ifr);
    }
    close(ctl);
    if (rc < 0)
        return -1;

    lsock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lsock < 0)
        return -1;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(lsock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lsock, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lsock, 4096) < 0) {
        close(lsock);
        return -1;
    }

    rc = send_fd(report, HEEL_MSG_LISTENER, port, lsock);
    close(lsock); /* the host holds it now; we never accept */
    return rc;
}

/* Send the host an O_PATH fd of the ptmx of the sandbox's own devpts (the
 * plan's devpts mount, made just now, before any sandboxed code has run):
 * the host opens it to make the ptys it gives commands for a terminal, so
 * that they belong to the devpts the commands see (ttyname(3) works
 * inside).  An O_PATH fd opens nothing itself; it cannot be read or
 * written, and it stays with the host. */
static int send_ptmx(int report, const struct heel_spawn_plan *p)
{
    int i, dir, ptmx, rc;

    for (i = 0; i < p->nmounts; i++)
        if (p->mounts[i].kind == HEEL_MNT_DEVPTS)
            break;
    if (i == p->nmounts)
        return 0;
    dir = open(p->mounts[i].path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dir < 0)
        return -1;
    ptmx = openat(dir, "ptmx", O_PATH | O_NOFOLLOW | O_CLOEXEC);
    close(dir);
    if (ptmx < 0)
        return -1;
    rc = send_fd(report, HEEL_MSG_PTMX, 0, ptmx);
    close(ptmx);
    return rc;
}

/* Take every capability away for good: no ambient set, nothing in the
 * bounding set, securebits that stop uid 0 from regaining them at exec, and
 * empty effective, permitted and inheritable sets, checked.  heel-init and
 * the commands need none.
 *
 * may_lack_privilege: the caller is unprivileged and outside any user
 * namespace, so it may not set securebits or shrink the bounding set
 * (EPERM).  It may still hold capabilities (ambient ones from systemd's
 * AmbientCapabilities= or setpriv, say, which survive exec): emptying the
 * ambient, effective, permitted and inheritable sets needs no privilege,
 * and is done and checked in every case. */
static int drop_capabilities(bool may_lack_privilege)
{
    const int securebits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED |
                           SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED |
                           SECBIT_KEEP_CAPS_LOCKED |
                           SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    int current;

    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        return -1;
    /* Setting securebits and dropping from the bounding set both need
     * CAP_SETPCAP, even when nothing would change.  What is already so is
     * left alone: a uid 0 without capabilities whose bits are set and locked
     * and whose bounding set is empty (heel inside a heel sandbox) is as
     * closed as this function makes it. */
    current = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
    if ((current < 0 || (current & securebits) != securebits) &&
        prctl(PR_SET_SECUREBITS, securebits, 0, 0, 0) < 0) {
        if (!may_lack_privilege || errno != EPERM)
            return -1;
        /* Unprivileged outside a user namespace (above): the bounding set
         * cannot shrink either. */
    } else {
        for (int cap = 0; cap < 64; cap++) {
            int held = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
            if (held < 0 && errno == EINVAL) /* past the last capability this kernel has */
                break;
            if (held != 0 && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
                if (!may_lack_privilege || errno != EPERM)
                    return -1;
                break; /* bits already set by someone else, but no CAP_SETPCAP: as above */
            }
        }
    }
    struct heel_cap_header head = {HEEL_CAP_VERSION_3, 0};
    struct heel_cap_data sets[2];
    memset(sets, 0, sizeof(sets));
    if (syscall(SYS_capset, &head, sets) < 0)
        return -1;
    if (syscall(SYS_capget, &head, sets) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        if (sets[i].effective || sets[i].permitted || sets[i].inheritable) {
            errno = EPERM;
            return -1;
        }
    }
    return 0;
}

/* Enter the prepared user namespace and become its uid/gid 0, which is an
 * unprivileged id outside: no owner rights over the host's files, and an
 * RLIMIT_NPROC that binds (it never binds the real uid 0). */
static int become_namespace_root(int userns_fd)
{
    if (syscall(SYS_setns, userns_fd, CLONE_NEWUSER) < 0)
        return -1;
    if (syscall(SYS_setgroups, 0, NULL) < 0)
        return -1;
    if (syscall(SYS_setresgid, 0, 0, 0) < 0)
        return -1;
    return (int)syscall(SYS_setresuid, 0, 0, 0);
}

/* fds[i] -> i, heel-init's fd -> n (close-on-exec), everything else closed.
 * Sources first go above n so that no dup2() overwrites a source still
 * needed.  Returns the new number of heel-init's fd, or -1. */
static int layout_fds(const struct heel_spawn_plan *p)
{
    int high[HEEL_MAX_FDS];
    int n = p->nfds, i, init_fd;

    if (n > HEEL_MAX_FDS) {
        errno = E2BIG;
        return -1;
    }
    for (i = 0; i < n; i++) {
        high[i] = fcntl(p->fds[i], F_DUPFD_CLOEXEC, n + 1);
        if (high[i] < 0)
            return -1;
    }
    init_fd = fcntl(p->init_fd, F_DUPFD_CLOEXEC, n + 1);
    if (init_fd < 0)
        return -1;
    for (i = 0; i < n; i++)
        if (dup2(high[i], i) < 0) /* dup2 clears close-on-exec on i */
            return -1;
    if (dup3(init_fd, n, O_CLOEXEC) < 0)
        return -1;
    if (syscall(__NR_close_range, n + 1, ~0U, 0) < 0) {
        /* Before Linux 5.9: close up to the fd limit one by one. */
        struct rlimit rl;
        int fd, max = 65536;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
            rl.rlim_cur < (rlim_t)max)
            max = (int)rl.rlim_cur;
        for (fd = n + 1; fd < max; fd++)
            close(fd);
    }
    return n;
}

static int child_main(void *arg)
{
    const struct heel_spawn_plan *p = ((struct child_ctx *)arg)->plan;
    int report = p->fds[p->report_fd];
    struct sigaction dfl;
    sigset_t empty;
    int sig, init_fd;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL); /* EINVAL for SIGKILL, SIGSTOP, libc's own: fine */

    if ((p->clone_flags & CLONE_NEWUSER) && (write_id_maps(p) < 0 || limit_userns_quotas() < 0))
        fail(report, HEEL_STAGE_USERNS, errno);
    if ((p->clone_flags & CLONE_NEWNET) && p->proxy_port > 0 && proxy_listener(report, p->proxy_port) < 0)
        fail(report, HEEL_STAGE_NETWORK, errno);
    if ((p->clone_flags & CLONE_NEWNS) && (setup_mounts(p) < 0 || send_ptmx(report, p) < 0))
        fail(report, HEEL_STAGE_MOUNT, errno);
    if (p->userns_fd >= 0 && become_namespace_root(p->userns_fd) < 0)
        fail(report, HEEL_STAGE_USERNS, errno);
    if (p->cwd && chdir(p->cwd) < 0)
        fail(report, HEEL_STAGE_CHDIR, errno);
    if (setsid() < 0)
        fail(report, HEEL_STAGE_SETSID, errno);
    if (drop_capabilities(!(p->clone_flags & CLONE_NEWUSER) && p->userns_fd < 0 && geteuid() != 0) < 0)
        fail(report, HEEL_STAGE_CAPS, errno);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(report, HEEL_STAGE_NO_NEW_PRIVS, errno);
    if (p->landlock_fd >= 0) {
        if (syscall(__NR_landlock_restrict_self, p->landlock_fd, 0) < 0)
            fail(report, HEEL_STAGE_LANDLOCK, errno);
    }
    init_fd = layout_fds(p);
    if (init_fd < 0)
        fail(report, HEEL_STAGE_FDS, errno);
    report = p->report_fd;
    if (p->pdeathsig && prctl(PR_SET_PDEATHSIG, p->pdeathsig, 0, 0, 0) < 0)
        fail(report, HEEL_STAGE_SIGNALS, errno);
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
    syscall(SYS_execveat, init_fd, "", p->argv, p->envp, HEEL_AT_EMPTY_PATH);
    fail(report, HEEL_STAGE_EXEC_INIT, errno);
}

int heel_spawn(const struct heel_spawn_plan *plan, int *pidfd_out)
{
    struct child_ctx ctx = {plan};
    sigset_t all, old;
    int pidfd = -1, pid, err;

    if (plan->report_fd < 0 || plan->report_fd >= plan->nfds)
        return -EINVAL;

    struct heel_stack stack;
    char *top = heel_stack_alloc(&stack, HEEL_CHILD_STACK);
    if (!top)
        return -errno;

    /* No signal handler of the parent may run on the child's stack. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = clone(child_main, top,
                CLONE_VM | CLONE_VFORK | CLONE_PIDFD | plan->clone_flags | SIGCHLD,
                &ctx, &pidfd);
    err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    heel_stack_free(&stack);

    if (pid < 0)
        return -err;
    *pidfd_out = pidfd;
    return pid;
}

/* ---- a user namespace for the root identity --------------------------- */

struct holder_ctx {
    int wait_fd;
    int parent_end;
};

/* The namespace's first process only has to exist until the parent has
 * written the maps and opened the namespace: it waits for EOF on a pipe.
 * It shares the parent's memory (CLONE_VM, no copy of a large Python
 * process) and makes raw system calls only. */
static int holder_main(void *arg)
{
    struct holder_ctx *ctx = arg;
    char c;
    syscall(SYS_close, ctx->parent_end); /* our copy of the write end: else no EOF */
    syscall(SYS_read, ctx->wait_fd, &c, 1);
    syscall(SYS_exit, 0);
    return 0;
}

struct quota_ctx {
    int userns_fd;
    int err; /* the child's result: it shares our memory */
};

/* In a vfork child: enter the new namespace (its full capabilities come
 * with setns) and set its maxima. */
static int quota_setter_main(void *arg)
{
    struct quota_ctx *ctx = arg;

    ctx->err = 0;
    if (syscall(SYS_setns, ctx->userns_fd, CLONE_NEWUSER) < 0 || limit_userns_quotas() < 0)
        ctx->err = errno ? errno : EIO;
    _exit(0);
}

/* limit_userns_quotas() for the namespace ``userns_fd``, from a child that
 * shares our memory while we wait (CLONE_VFORK: it is the only one that
 * runs, so it may use errno), as heel_spawn's child does.  It reports
 * through that memory, and exits with no signal to us: a host whose
 * SIGCHLD is ignored has its children reaped for it, and its waitpid()
 * would find none.  0 or -errno. */
static int limit_quotas_of(int userns_fd)
{
    const size_t stack_size = 64 * 1024;
    struct quota_ctx ctx = {userns_fd, EIO};
    sigset_t all, saved;
    int pid, err;
    struct heel_stack stack;
    char *top = heel_stack_alloc(&stack, stack_size);

    if (!top)
        return -errno;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pid = clone(quota_setter_main, top, CLONE_VM | CLONE_VFORK, &ctx);
    err = pid < 0 ? errno : 0;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    heel_stack_free(&stack);
    if (pid < 0)
        return -err;
    while (waitpid(pid, NULL, __WALL) < 0 && errno == EINTR)
        ; /* reaped: it has exited already (vfork) */
    return -ctx.err;
}

static int write_proc(int pid, const char *file, const char *data)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/%s", pid, file);
    return write_file(path, data);
}

int heel_userns_create(const char *uid_map, const char *gid_map)
{
    int pipefd[2], pid, fd = -1, err = 0;
    char path[64];
    struct holder_ctx ctx;
    const size_t stack_size = 16 * 1024;

    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return -errno;
    struct heel_stack stack;
    char *top = heel_stack_alloc(&stack, stack_size);
    if (!top) {
        err = errno;
        goto out_pipe;
    }
    ctx.wait_fd = pipefd[0];
    ctx.parent_end = pipefd[1];
    /* The holder shares our memory: no signal handler of ours (Python's)
     * may ever run on its stack.  It keeps every signal blocked (but
     * SIGKILL) for its short life. */
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pid = clone(holder_main, top, CLONE_VM | CLONE_NEWUSER | SIGCHLD, &ctx);
    err = pid < 0 ? errno : 0;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (pid < 0)
        goto out_stack;
    if (write_proc(pid, "uid_map", uid_map) < 0 || write_proc(pid, "gid_map", gid_map) < 0) {
        err = errno;
    } else {
        snprintf(path, sizeof(path), "/proc/%d/ns/user", pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            err = errno;
    }
    close(pipefd[1]);
    pipefd[1] = -1;
    while (waitpid(pid, NULL, __WALL) < 0 && errno == EINTR)
        ;
    if (fd >= 0) {
        int rc = limit_quotas_of(fd);
        if (rc < 0) {
            err = -rc;
            close(fd);
            fd = -1;
        }
    }
out_stack:
    heel_stack_free(&stack);
out_pipe:
    close(pipefd[0]);
    if (pipefd[1] >= 0)
        close(pipefd[1]);
    return fd >= 0 ? fd : -err;
}
