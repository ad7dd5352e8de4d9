/*
 * init.c - heel-init: the zygote of a sandbox, and the init of each command.
 *
 * The spawn trampoline (spawn.c) builds a sandbox once, when it opens: the
 * namespaces, the mount view, the Landlock domain, no_new_privs.  Its last
 * step execs heel-init, which then serves the host for as long as the
 * sandbox lives, as a zygote: for each command the host sends a request
 * (heel.h: argv, environment, cwd, rlimits and four fds), and heel-init
 *   - forks the command's init, a child subreaper (still heel-init's code,
 *     no exec), and answers with its pid and a pidfd for it.
 * The command's init then
 *   - forks the command, which sets up its fds, cwd and rlimits, enters a
 *     Landlock domain of its own that scopes signals and abstract unix
 *     sockets (so it cannot signal its init, other commands or heel-init),
 *     and execs (the seccomp filter it inherits: heel-init installs it once);
 *   - tells the host on the command's own control socket whether execve
 *     worked (struct heel_msg);
 *   - forwards the host's signals to the command;
 *   - when the command exits, or the host asks for it or goes away, kills
 *     every remaining process of the command (orphans come to it, the
 *     subreaper), and only then reports the command's wait status, so that
 *     "exited" means "nothing is left".
 * So a command costs two forks of this small process instead of new
 * namespaces, mounts and a Landlock ruleset each time.  The commands share
 * the sandbox's pid namespace (and its /proc, which then agrees with
 * getpid()).
 *
 * Usage: heel-init CTL_FD FLAGS [IPC_FD] (HEEL_INIT_* in heel.h).  IPC_FD,
 * when given, is the sandbox's IPC socket: every command gets it as fd
 * HEEL_IPC_FD (heel.client speaks over it).  With
 * HEEL_INIT_PIDNS heel-init is pid 1 of the sandbox's pid namespace; when
 * the host's end of CTL_FD closes (the host exited or died) it exits, and
 * its end is the end of every process in the namespace.  Without a pid
 * namespace it is a subreaper, and kills its descendants before it exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/filter.h>
#include <linux/seccomp.h>

#include "heel.h"
#include "syscalls.h"

#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif

#define EXIT_INIT_FAILED 125
#define EXIT_EXEC_FAILED 127

/* The search path when the command's environment has no PATH. */
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

/* Subreaper mode gives up after this many kill rounds (about 10 s when
 * every round has to pause 1 ms) rather than hang on a process that cannot
 * be killed: one stuck in uninterruptible sleep, or one outrunning SIGKILL
 * with forks. */
#define MAX_KILL_ROUNDS 10000

#define FILTER_CAP 1024

/* Every signal that can be blocked is, in heel-init and in each command's
 * init, and read from a signalfd: a signal whose default action is to end
 * the process must not end an init (and leave its command to the zygote).
 * A command's init passes on to the command every signal but SIGCHLD. */
static void handled_signals(sigset_t *set)
{
    sigfillset(set);
    sigdelset(set, SIGKILL);
    sigdelset(set, SIGSTOP);
}

/* What every command of the sandbox shares, set up once in main(). */
struct zygote {
    int ctl;            /* heel-init's control socket to the host */
    int sfd;            /* its signalfd */
    int ipc_fd;         /* the sandbox's IPC socket, given to every command (-1: none) */
    int pidns;          /* heel-init is pid 1 of the sandbox's pid namespace */
    int own_domain;     /* each command gets a Landlock domain of its own */
    uint64_t scope;     /* ... which scopes signals and abstract sockets (ABI >= 6) */
    int landlock_abi;   /* the kernel's Landlock ABI (< 1: none), read when own_domain */
    sigset_t orig_mask; /* the signal mask commands start with */
    pid_t *inits;       /* the commands' inits still running: every other child is an escapee */
    size_t ninits, cap;
};

/* One command: its request, and then its init's state. */
struct command {
    struct heel_request_head head;
    const struct heel_rlimit *rlimits;
    const char *cwd;
    const char *program;
    char **argv;
    char **envp;
    int fds[HEEL_REQUEST_FDS]; /* stdin, stdout, stderr, control socket */
    char *payload;
    /* the command's init */
    int ctl;
    pid_t pid;
    int reaped;         /* status is valid; the pid may be recycled */
    int status;
    int scoped;         /* the init is in a signal-scoped domain of its own (see command_init) */
};

static struct heel_bpf_insn filter_code[FILTER_CAP];

/* Send one message whole.  MSG_NOSIGNAL: a host that went away is an
 * ordinary error here, not a SIGPIPE.  The host may have made the socket
 * non-blocking; then wait until it can take the rest. */
static void send_msg(int ctl, int32_t kind, int32_t a, int32_t b)
{
    struct heel_msg msg = {kind, a, b};
    const char *p = (const char *)&msg;
    size_t left = sizeof(msg);

    while (left > 0) {
        ssize_t n = send(ctl, p, left, MSG_NOSIGNAL);
        if (n < 0) {
            struct pollfd pfd = {.fd = ctl, .events = POLLOUT};
            if (errno == EAGAIN)
                poll(&pfd, 1, -1);
            else if (errno != EINTR)
                return;
            continue;
        }
        p += n;
        left -= (size_t)n;
    }
}

__attribute__((noreturn))
static void fail(int ctl, int stage, int err, int exit_status)
{
    send_msg(ctl, HEEL_MSG_ERROR, stage, err);
    _exit(exit_status);
}

/* Read until len bytes or end of file.  Returns the count, or -1. */
static ssize_t read_full(int fd, void *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

/* A decimal int >= 0 with no sign, space or trailing text; -1 otherwise. */
static int parse_decimal(const char *s)
{
    char *end;
    long v;

    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v > INT_MAX)
        return -1;
    return (int)v;
}

/* An ignored disposition survives execve.  An ignored SIGCHLD would make the
 * kernel reap children behind our back, and commands must start from the
 * defaults, so heel-init does not rely on its caller having reset them. */
static void reset_signal_dispositions(void)
{
    struct sigaction dfl;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL); /* EINVAL for SIGKILL, SIGSTOP, libc's own: fine */
}

/* ---- starting the command ---------------------------------------------- */

/* execvp without glibc's extras, in the forked child.  Returns the errno to
 * report.  As execvp: a PROGRAM with a '/' is used as is; otherwise each PATH
 * entry is tried in order (an empty entry is the current directory), a
 * missing file moves on to the next entry, EACCES is remembered and reported
 * only if nothing else works, and any other error stops the search.  Unlike
 * glibc, a file the kernel cannot execute (ENOEXEC: no #! line) is not
 * retried with /bin/sh: that would be a guess about an untrusted file, and
 * the user can name the interpreter. */
static int exec_command(const char *program, char *const argv[], char *const envp[])
{
    const char *path = NULL;
    size_t program_len = strlen(program);
    int err = ENOENT, seen_eacces = 0;
    char candidate[PATH_MAX];
    const char *dir, *dir_end;

    if (strchr(program, '/') != NULL) {
        execve(program, argv, envp);
        return errno;
    }
    if (program_len == 0)
        return ENOENT;
    for (char *const *e = envp; *e != NULL; e++)
        if (strncmp(*e, "PATH=", 5) == 0)
            path = *e + 5;
    if (path == NULL)
        path = DEFAULT_PATH;

    dir = path;
    do {
        size_t dir_len;

        dir_end = strchrnul(dir, ':');
        dir_len = (size_t)(dir_end - dir);
        if (dir_len + 1 + program_len + 1 > sizeof(candidate)) {
            err = ENAMETOOLONG;
        } else {
            memcpy(candidate, dir, dir_len);
            if (dir_len > 0)
                candidate[dir_len++] = '/';
            memcpy(candidate + dir_len, program, program_len + 1);
            execve(candidate, argv, envp);
            switch (errno) {
            case EACCES:
                seen_eacces = 1;
                break;
            case ENOENT:
            case ENOTDIR:
            case ESTALE:
            case ENODEV:
            case ETIMEDOUT:
                err = errno;
                break;
            default:
                return errno;
            }
        }
        dir = dir_end + 1;
    } while (*dir_end != '\0');
    return seen_eacces ? EACCES : err;
}

/* A Landlock domain of the command's own, nested in the sandbox's.  It
 * grants nothing and handles only MAKE_BLOCK (which no rule grants anyway),
 * so file access stays as the sandbox's domain has it; what it adds is the
 * line between commands: Landlock refuses ptrace-class access (/proc/PID/mem,
 * environ, fd) to processes outside one's domain, and with ABI 6 its scopes
 * also stop signals and abstract unix sockets crossing it.  So a command
 * cannot reach its init, heel-init or another command. */
#define LL_MAKE_BLOCK (1ULL << 11)
#define LL_REFER (1ULL << 13)          /* ABI 2 */

/* A layer that does not handle REFER refuses every rename or link into
 * another directory (Landlock's ABI 1 rule): this one handles it and grants
 * it everywhere, so that the sandbox's own layer alone decides (tools that
 * write a temporary file and move it into place depend on it).  On ABI 1
 * the kernel knows no REFER, and the sandbox's layer refuses those moves
 * anyway. */
static int enter_own_domain(int abi, uint64_t scoped)
{
    uint64_t handled = LL_MAKE_BLOCK | (abi >= 2 ? LL_REFER : 0);
    int fd = heel_landlock_create(handled, 0, scoped);
    int rc;

    if (fd < 0) {
        errno = -fd;
        return -1;
    }
    rc = (handled & LL_REFER) ? heel_landlock_add_path(fd, "/", LL_REFER) : 0;
    if (rc == 0)
        rc = syscall(__NR_landlock_restrict_self, fd, 0) < 0 ? -errno : 0;
    close(fd);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return 0;
}

/* In the forked child: tell the command's init what failed, and end. */
__attribute__((noreturn))
static void child_failed(int report, int stage, int err)
{
    int msg[2] = {stage, err};
    while (write(report, msg, sizeof(msg)) < 0 && errno == EINTR)
        continue;
    _exit(EXIT_EXEC_FAILED);
}

/* stdin, stdout and stderr at 0, 1 and 2; the sandbox's IPC socket, when
 * there is one, at HEEL_IPC_FD (3); the report pipe next (closed by
 * execve); every other fd closed.  Sources first go above all of these, so
 * that no dup2() overwrites a source still needed.  *report follows the
 * report pipe, so that a failure can still be told.  Returns 0 or -1. */
static int layout_fds(const struct zygote *z, const struct command *c, int *report)
{
    int src[5], n = 0, i, first_free;

    for (i = 0; i < 3; i++)
        src[n++] = c->fds[i];
    if (z->ipc_fd >= 0)
        src[n++] = z->ipc_fd;
    src[n++] = *report;
    for (i = 0; i < n; i++) {
        src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, n);
        if (src[i] < 0)
            return -1;
    }
    *report = src[n - 1];
    /* dup2 clears close-on-exec on its target: all but the report pipe. */
    for (i = 0; i < n - 1; i++)
        if (dup2(src[i], i) < 0)
            return -1;
    if (dup3(src[n - 1], n - 1, O_CLOEXEC) < 0)
        return -1;
    *report = n - 1;
    first_free = n;
    if (syscall(__NR_close_range, first_free, ~0U, 0) < 0) {
        /* Before Linux 5.9: close up to the fd limit one by one. */
        struct rlimit rl;
        int fd, max = 65536;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
            rl.rlim_cur < (rlim_t)max)
            max = (int)rl.rlim_cur;
        for (fd = first_free; fd < max; fd++)
            close(fd);
    }
    return 0;
}

/* The command's side of the fork: everything that is the command's alone,
 * then execve.  (No capabilities and the seccomp filter it has already,
 * from heel-init.)  The order: a session of its own (no controlling
 * terminal: no TIOCSTI into the host's tty, and a process group that is a
 * handle on the command's processes); the fds, and heel's pty as the
 * controlling terminal when the request asks; the cwd; the Landlock scope;
 * the rlimits last, so that a small RLIMIT_NOFILE stops neither the layout
 * nor the Landlock ruleset's fd (open_files=3 leaves the command its three
 * standard streams). */
__attribute__((noreturn))
static void become_command(const struct zygote *z, const struct command *c, int report)
{
    setsid(); /* fails (EPERM) only for a process group leader, which a fresh child is not */
    if (layout_fds(z, c, &report) < 0)
        child_failed(report, HEEL_STAGE_FDS, errno);
    if ((c->head.flags & HEEL_REQUEST_CTTY) && ioctl(0, TIOCSCTTY, 0) < 0)
        child_failed(report, HEEL_STAGE_FDS, errno);
    if (chdir(c->cwd) < 0)
        child_failed(report, HEEL_STAGE_CHDIR, errno);
    if (z->own_domain && enter_own_domain(z->landlock_abi, z->scope) < 0)
        child_failed(report, HEEL_STAGE_LANDLOCK, errno);
    for (uint32_t i = 0; i < c->head.nrlimits; i++) {
        struct rlimit rl = {c->rlimits[i].soft, c->rlimits[i].hard};
        if (setrlimit(c->rlimits[i].resource, &rl) < 0)
            child_failed(report, HEEL_STAGE_RLIMIT, errno);
    }
    sigprocmask(SIG_SETMASK, &z->orig_mask, NULL);
    child_failed(report, HEEL_STAGE_EXEC, exec_command(c->program, c->argv, c->envp));
}

/* Fork the command.  Returns its pid once execve has succeeded; on any
 * failure reports it and exits.  A close-on-exec pipe tells the two apart:
 * end of file with no data means execve went through, otherwise the child
 * wrote (stage, errno) before exiting. */
static pid_t start_command(const struct zygote *z, const struct command *c)
{
    int exec_pipe[2], msg[2];
    ssize_t n;
    pid_t pid;

    if (pipe2(exec_pipe, O_CLOEXEC) < 0)
        fail(c->ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    pid = fork();
    if (pid < 0)
        fail(c->ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    if (pid == 0) {
        close(exec_pipe[0]);
        become_command(z, c, exec_pipe[1]);
    }

    close(exec_pipe[1]);
    n = read_full(exec_pipe[0], msg, sizeof(msg));
    close(exec_pipe[0]);
    if (n == 0)
        return pid;

    /* The child is not reaped yet, so its pid cannot have been recycled. */
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        continue;
    if (n == (ssize_t)sizeof(msg))
        fail(c->ctl, msg[0], msg[1], EXIT_EXEC_FAILED);
    /* A pipe write this small is atomic, so a short read cannot happen. */
    fail(c->ctl, HEEL_STAGE_INIT, n < 0 ? errno : EIO, EXIT_INIT_FAILED);
}

/* ---- the command's init ------------------------------------------------ */

/* Reap every child that has exited, without blocking.  Returns how many
 * were reaped, or -1 when there is no child left at all. */
static int reap_exited(struct command *c, int most)
{
    int reaped = 0, status;
    pid_t pid = 0;

    while ((most <= 0 || reaped < most) && (pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (c != NULL && pid == c->pid) {
            c->status = status;
            c->reaped = 1;
        }
        reaped++;
    }
    if (reaped == 0 && pid < 0 && errno == ECHILD)
        return -1;
    return reaped;
}

/* Zombies reaped at most per turn of run_until_end: the host's messages
 * are read between turns.  A fork bomb whose processes fork and exit (each
 * child left to us) makes zombies as fast as we reap them, and reaping
 * until none was left kept the init from ever reading the host's KILL
 * (found by review). */
#define REAP_PER_TURN 256

/* Take what the signalfd has (one read) and reap up to REAP_PER_TURN
 * zombies, when a SIGCHLD came or *backlog says some may be left from the
 * turn before; *backlog is set when this turn reaped its most.  Returns 1
 * once the command has exited. */
static int handle_signals(struct command *c, int sfd, int *backlog)
{
    struct signalfd_siginfo info[8];
    ssize_t n;
    int reap = *backlog;

    do {
        n = read(sfd, info, sizeof(info));
    } while (n < 0 && errno == EINTR);
    for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof(info[0]); i++) {
        if (info[i].ssi_signo == SIGCHLD)
            reap = 1;
        else if (!c->reaped)
            /* The command is reaped only below, and its init ends right
             * then, so this pid still names the command (at worst a
             * zombie), never a recycled pid. */
            kill(c->pid, (int)info[i].ssi_signo);
    }
    *backlog = reap && reap_exited(c, REAP_PER_TURN) == REAP_PER_TURN;
    return c->reaped;
}

/* A message from the host, read in as many pieces as the socket delivers. */
struct ctl_reader {
    struct heel_msg msg;
    size_t have;
};

/* Read what the control socket has.  Returns 1 when the host asked for the
 * end (HEEL_MSG_KILL) or went away (end of file, error, hang-up).  A
 * HEEL_MSG_SIGNAL is passed on to the command: SIGSTOP cannot be forwarded
 * as the other signals are, since it would stop this init instead. */
static int handle_ctl(const struct command *c, struct ctl_reader *r)
{
    ssize_t n = read(c->ctl, (char *)&r->msg + r->have, sizeof(r->msg) - r->have);

    if (n < 0)
        return errno != EINTR && errno != EAGAIN;
    if (n == 0)
        return 1;
    r->have += (size_t)n;
    if (r->have < sizeof(r->msg))
        return 0;
    r->have = 0;
    /* Unreaped here (we return once it is), so the pid is still the command's. */
    if (r->msg.kind == HEEL_MSG_SIGNAL && r->msg.a > 0 && r->msg.a < NSIG && !c->reaped)
        kill(c->pid, r->msg.a);
    return r->msg.kind == HEEL_MSG_KILL; /* other kinds mean nothing here */
}

/* Serve signals and the host until the command's end. */
static void run_until_end(struct command *c, int sfd)
{
    struct pollfd fds[2] = {
        {.fd = sfd, .events = POLLIN},
        {.fd = c->ctl, .events = POLLIN},
    };
    struct ctl_reader reader = {.have = 0};
    int backlog = 0; /* zombies may be left from the turn before: no waiting */

    for (;;) {
        if (poll(fds, 2, backlog ? 0 : -1) < 0) {
            if (errno == EINTR)
                continue;
            return; /* the command can no longer be watched: end it */
        }
        /* Signals first: the command's exit is reported if it came first. */
        if ((fds[0].revents != 0 || backlog) && handle_signals(c, sfd, &backlog))
            return;
        /* Any event, POLLHUP and POLLERR included, shows in the read. */
        if (fds[1].revents != 0 && handle_ctl(c, &reader))
            return;
    }
}

/* heel-init as pid 1, when the host is gone.  kill(-1) from pid 1 reaches
 * every other process of the namespace and nothing outside it; a process
 * being killed cannot fork any more, so one call suffices.  Everything is
 * SIGKILLed, so a blocking wait ends. */
static void kill_namespace(void)
{
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
        continue; /* until ECHILD: nothing is left */
}

/* Without /proc, kill what can be named safely.  The command's pid is used
 * only while it is unreaped, and its process group only while one of our
 * children is still in it: either way the id is held and cannot have been
 * recycled by an unrelated process.  An orphan that left the group (setsid)
 * cannot be reached this way.  Returns how many targets there were. */
static int kill_command_group(const struct command *c)
{
    siginfo_t info;
    int targets = 0;

    if (c == NULL)
        return 0;
    if (!c->reaped) {
        kill(c->pid, SIGKILL);
        targets++;
    }
    if (waitid(P_PGID, (id_t)c->pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0) {
        kill(-c->pid, SIGKILL);
        targets++;
    }
    return targets;
}

/* The pids of a /proc children file, up to cap into out.  Returns how
 * many, or -1 when it cannot be read. */
static int read_children(const char *path, pid_t *out, int cap)
{
    char buf[4096];
    long long pid = 0;
    int count = 0;
    ssize_t len;
    int fd;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    len = read_full(fd, buf, sizeof(buf));
    close(fd);
    if (len < 0)
        return -1;
    /* "PID PID ... ": each pid ends with a space.  One cut off by a full
     * buffer has none yet and is left for the next round. */
    for (ssize_t i = 0; i < len && count < cap; i++) {
        char ch = buf[i];
        if (ch == ' ') {
            if (pid > 0 && pid <= INT_MAX)
                out[count++] = (pid_t)pid;
            pid = 0;
        } else if (pid >= 0 && ch >= '0' && ch <= '9' && pid <= INT_MAX) {
            pid = pid * 10 + (ch - '0');
        } else {
            pid = -1; /* not a pid: skip to the next space */
        }
    }
    return count;
}

/* Our direct children, as /proc lists them: up to cap pids into out.
 * Returns how many, or -1 when /proc cannot tell.  Nothing may be reaped
 * while the list is used, so that each pid in it still names that child (a
 * zombie keeps its pid), never a recycled one. */
static int list_children(pid_t *out, int cap)
{
    char path[64];

    /* Single-threaded: the only thread has tid == pid. */
    snprintf(path, sizeof(path), "/proc/self/task/%d/children", (int)getpid());
    return read_children(path, out, cap);
}

/* The children of every thread of a process, up to cap into out. */
static int list_process_children(pid_t pid, pid_t *out, int cap)
{
    char path[64];
    struct dirent *entry;
    int count = 0;
    DIR *tasks;

    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    tasks = opendir(path);
    if (tasks == NULL)
        return 0;
    while (count < cap && (entry = readdir(tasks)) != NULL) {
        if (entry->d_name[0] < '0' || entry->d_name[0] > '9')
            continue;
        snprintf(path, sizeof(path), "/proc/%d/task/%.16s/children", (int)pid, entry->d_name);
        int n = read_children(path, out + count, cap - count);
        if (n > 0)
            count += n;
    }
    closedir(tasks);
    return count;
}

/* Whether a process has stopped (or died): the state after its name in
 * /proc/PID/stat is T, t, Z or X.  A process gone from /proc counts. */
static int has_stopped(pid_t pid)
{
    char path[64], buf[512];
    ssize_t len;
    int fd;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    len = read_full(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (len <= 0)
        return 1;
    buf[len] = '\0';
    char *end = strrchr(buf, ')'); /* the name may hold anything, but not past its last ')' */
    return end == NULL || end[1] == '\0' || strchr("TtZX", end[2]) != NULL;
}

/* A field of /proc/PID/status ("PPid:") or of /proc/self/fdinfo/FD
 * ("Pid:") as an int; -2 when it cannot be read. */
static int status_field(const char *path, const char *field)
{
    char buf[2048];
    ssize_t len;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return -2;
    len = read_full(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (len <= 0)
        return -2;
    buf[len] = '\0';
    size_t flen = strlen(field);
    for (char *line = buf; line != NULL && *line != '\0'; line = strchr(line, '\n'), line = line ? line + 1 : NULL) {
        if (strncmp(line, field, flen) == 0)
            return (int)strtol(line + flen, NULL, 10);
    }
    return -2;
}

/* The pid a pidfd's process has now: -1 once it has been reaped. */
static int pinned_pid(int pidfd)
{
    char path[64];

    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
    return status_field(path, "Pid:");
}

/* A pidfd on the process with this pid, checked to be a child of parent:
 * the pid may have been freed and taken by another process since it was
 * listed (a parent that ignores SIGCHLD has its children reaped at once,
 * stopped or not).  The pidfd is opened first, then the parent read, then
 * the pidfd found still on that pid: alive (or a zombie) all along, its
 * process is the one whose parent was read.  A stopped parent cannot have
 * made a new child meanwhile.  -1 when it cannot be pinned. */
static int pin_child(pid_t pid, pid_t parent)
{
    char path[64];
    int pidfd = (int)syscall(__NR_pidfd_open, pid, 0);

    if (pidfd < 0)
        return -1;
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    if (status_field(path, "PPid:") == (int)parent) {
        if (pinned_pid(pidfd) == (int)pid)
            return pidfd;
    }
    close(pidfd);
    return -1;
}

#define FREEZE_MAX 65536
#define FREEZE_WAIT_NS (200 * 1000 * 1000)

/* Stop every descendant, top-down, then SIGKILL them all.  Killing level
 * by level (each round kills our children; their orphans come to us for
 * the next) takes a round per level of a chain, and a chain thousands
 * deep outlived the time the host gives (found by review); each process
 * also outlived its parent long enough to act on its death.  Here each
 * process is stopped before its children are listed, so that it can fork
 * no more, and every signal goes through a pidfd pinned on a process
 * checked to be the lister's child (pin_child): a pid that was freed and
 * taken by another process (review found a command that had its init kill
 * another command's process that way) is never signalled.  A process
 * that does not stop (uninterruptible sleep, as a vfork parent waits) is
 * listed all the same, and SIGKILL still ends it.  What this leaves
 * (children forked after their parent was listed, by a process that did
 * not stop or was SIGCONTed; fds or FREEZE_MAX run out) is the rounds'
 * (kill_descendants), which signal only our own unreaped children.
 * Returns -1 when /proc cannot tell. */
static int frozen[FREEZE_MAX]; /* pidfds; static: each process (heel-init, a command's init) has its own copy */
static pid_t frozen_pid[FREEZE_MAX];

/* Nanoseconds on the monotonic clock. */
static int64_t monotonic_ns(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static int freeze_and_kill(void)
{
    const struct timespec pause = {.tv_sec = 0, .tv_nsec = 20 * 1000};
    /* In all, on the clock: a tree of processes that do not stop must not
     * hold the kill up for long.  (Counted in the pauses asked, it was
     * some seven times as long: each turn reads /proc, and the timer slack
     * stretches every pause; found by review.) */
    int64_t wait_until = -1;
    pid_t listed[1024];
    int n = 0, nlisted;
    struct rlimit nofile;

    nlisted = list_children(listed, (int)(sizeof(listed) / sizeof(listed[0])));
    if (nlisted <= 0)
        return nlisted; /* most commands leave nothing: no more work at their end */
    /* As many pidfds as the hard limit allows: this process ends soon. */
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    for (int i = 0; i < nlisted && n < FREEZE_MAX; i++) {
        int pidfd = pin_child(listed[i], getpid());
        if (pidfd >= 0) {
            frozen_pid[n] = listed[i];
            frozen[n++] = pidfd;
        }
    }
    for (int i = 0; i < n; i++) {
        syscall(__NR_pidfd_send_signal, frozen[i], SIGSTOP, NULL, 0);
        while (!has_stopped(frozen_pid[i])) {
            if (wait_until < 0)
                wait_until = monotonic_ns() + FREEZE_WAIT_NS;
            else if (monotonic_ns() >= wait_until)
                break;
            nanosleep(&pause, NULL);
        }
        /* Listed even when it did not stop (uninterruptible sleep: a vfork
         * parent waits so, and SIGSTOP never takes, though SIGKILL does):
         * what it forks after the list is the rounds'. */
        int first = n;
        nlisted = list_process_children(frozen_pid[i], listed, (int)(sizeof(listed) / sizeof(listed[0])));
        for (int j = 0; j < nlisted && n < FREEZE_MAX; j++) {
            int pidfd = pin_child(listed[j], frozen_pid[i]);
            if (pidfd >= 0) {
                frozen_pid[n] = listed[j];
                frozen[n++] = pidfd;
            }
        }
        /* Its pid was its own all along (killed and reaped, it could have
         * been taken, and the children read would be another's). */
        if (pinned_pid(frozen[i]) != frozen_pid[i]) {
            while (n > first)
                close(frozen[--n]);
        }
    }
    for (int i = 0; i < n; i++) {
        syscall(__NR_pidfd_send_signal, frozen[i], SIGKILL, NULL, 0);
        close(frozen[i]);
    }
    return n;
}

#define CHILDREN_PER_ROUND 1024

/* SIGKILL our direct children.  Returns how many targets there were. */
static int kill_children(const struct command *c)
{
    pid_t children[CHILDREN_PER_ROUND];
    int n = list_children(children, CHILDREN_PER_ROUND);

    if (n < 0)
        return kill_command_group(c);
    for (int i = 0; i < n; i++)
        kill(children[i], SIGKILL);
    return n;
}

/* Killing a process orphans its children, which the kernel hands to us,
 * the subreaper, for the next round; the rounds go on until there is no
 * child at all.  They stop early when a round has nothing to kill and
 * nothing to reap: /proc lists every child, zombies included, so that only
 * happens without /proc, once the children left are out of the fallback's
 * reach. */
static void kill_descendants(struct command *c)
{
    const struct timespec pause = {.tv_sec = 0, .tv_nsec = 1000 * 1000};

    /* In a signal-scoped domain of its own, the init may signal this
     * command's processes and no others (not heel-init, in a parent
     * domain, nor another command's, nor, without a pid namespace, any of
     * the host's), so one kill(-1)
     * reaches the whole tree at once: the kernel signals every process
     * under one lock that fork takes too, and a process with SIGKILL
     * pending forks no more.  A fork bomb whose processes fork and exit
     * (each child left to us) kept the top-down freeze below racing it,
     * with the init one runnable process among thousands (found by
     * review).  The freeze is for kernels without scoping (ABI < 6). */
    if (c == NULL || !c->scoped || kill(-1, SIGKILL) < 0)
        freeze_and_kill();
    for (int round = 0; round < MAX_KILL_ROUNDS; round++) {
        int targets, reaped;

        targets = kill_children(c);
        reaped = reap_exited(c, 0);
        if (reaped < 0 || (targets == 0 && reaped == 0))
            return;
        /* Nothing had died yet: give SIGKILL a moment rather than spin. */
        if (reaped == 0)
            nanosleep(&pause, NULL);
    }
}

/* The command's init: the child heel-init cloned for one request. */
__attribute__((noreturn))
static void command_init(const struct zygote *z, struct command *c)
{
    int sfd, report;
    sigset_t handled;

    /* The zygote's own fds are not the command's business. */
    close(z->ctl);
    close(z->sfd);
    c->ctl = c->fds[3];
    if (fcntl(c->ctl, F_SETFD, FD_CLOEXEC) < 0)
        _exit(EXIT_INIT_FAILED);

    /* The handled signals are blocked already (inherited from the zygote)
     * and read from a signalfd of our own. */
    handled_signals(&handled);
    sfd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0)
        fail(c->ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    /* Orphans of the command come to us, not to the zygote, so that the
     * command's end can be the end of all it started. */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        fail(c->ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);

    /* A Landlock domain of the init's own, scoped, in which the command's
     * own is nested: the init can signal the command's processes and
     * nothing of another command's (their inits and processes are in
     * sibling domains), and the command cannot signal its init (a parent
     * domain).  See kill_descendants.  Without a pid namespace too: the
     * scope, not the namespace, is what keeps its kill(-1) from the host's
     * processes (Landlock refuses a signal to any process outside the
     * init's domain and the domains nested in it, root's included, and
     * only the init's own descendants can be in those). */
    if (z->own_domain && (z->scope & HEEL_LANDLOCK_SCOPE_SIGNAL) &&
        enter_own_domain(z->landlock_abi, z->scope) == 0)
        c->scoped = 1;

    c->pid = start_command(z, c);
    for (int i = 0; i < 3; i++)
        close(c->fds[i]);
    send_msg(c->ctl, HEEL_MSG_STARTED, c->pid, 0);

    run_until_end(c, sfd);
    /* Only an exit seen before the shutdown is the command's own; one
     * caused by the shutdown (the host's end) is not reported. */
    report = c->reaped;
    kill_descendants(c);
    if (report)
        send_msg(c->ctl, HEEL_MSG_EXITED, c->status, 0);
    _exit(0);
}

/* ---- the zygote ---------------------------------------------------------- */

/* Receive the header of a request and its fds.  Returns the payload length,
 * 0 at end of file, or -errno. */
static long receive_header(int ctl, int fds[HEEL_REQUEST_FDS])
{
    uint32_t length;
    union { /* aligned for the cmsghdr in it */
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * HEEL_REQUEST_FDS)];
    } control;
    struct iovec iov = {.iov_base = &length, .iov_len = sizeof(length)};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof(control.buf),
    };
    struct cmsghdr *cmsg;
    ssize_t n;
    int got = 0;

    do {
        n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n == 0)
        return 0;
    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
            size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *passed = (int *)(void *)CMSG_DATA(cmsg);
            for (size_t i = 0; i < count; i++) {
                if (got < HEEL_REQUEST_FDS)
                    fds[got++] = passed[i];
                else
                    close(passed[i]);
            }
        }
    }
    if (got != HEEL_REQUEST_FDS || (msg.msg_flags & MSG_CTRUNC) ||
        (n < (ssize_t)sizeof(length) && read_full(ctl, (char *)&length + n,
                                                   sizeof(length) - (size_t)n) !=
                                            (ssize_t)(sizeof(length) - (size_t)n))) {
        for (int i = 0; i < got; i++)
            close(fds[i]);
        return -EPROTO;
    }
    if (length < sizeof(struct heel_request_head) || length > HEEL_REQUEST_MAX) {
        for (int i = 0; i < got; i++)
            close(fds[i]);
        return -EPROTO;
    }
    return (long)length;
}

/* Point at the next NUL-terminated string of the payload; NULL if none. */
static char *next_string(char **cursor, const char *end)
{
    char *s = *cursor;
    char *nul = memchr(s, '\0', (size_t)(end - s));

    if (nul == NULL)
        return NULL;
    *cursor = nul + 1;
    return s;
}

/* Parse a payload into c (which keeps pointers into it).  Returns 0 or -EPROTO. */
static int parse_request(struct command *c, char *payload, size_t length)
{
    const char *end = payload + length;
    char *cursor;
    size_t rl_bytes;

    memcpy(&c->head, payload, sizeof(c->head));
    if (c->head.nargv < 1 || c->head.nargv > length || c->head.nenv > length ||
        c->head.nrlimits > 64 || (c->head.flags & ~(uint32_t)HEEL_REQUEST_CTTY) != 0)
        return -EPROTO;
    rl_bytes = (size_t)c->head.nrlimits * sizeof(struct heel_rlimit);
    if (sizeof(c->head) + rl_bytes > length)
        return -EPROTO;
    c->rlimits = (const struct heel_rlimit *)(void *)(payload + sizeof(c->head));
    cursor = payload + sizeof(c->head) + rl_bytes;
    c->argv = calloc((size_t)c->head.nargv + 1, sizeof(char *));
    c->envp = calloc((size_t)c->head.nenv + 1, sizeof(char *));
    if (c->argv == NULL || c->envp == NULL)
        return -ENOMEM;
    if ((c->cwd = next_string(&cursor, end)) == NULL ||
        (c->program = next_string(&cursor, end)) == NULL)
        return -EPROTO;
    for (uint32_t i = 0; i < c->head.nargv; i++)
        if ((c->argv[i] = next_string(&cursor, end)) == NULL)
            return -EPROTO;
    for (uint32_t i = 0; i < c->head.nenv; i++)
        if ((c->envp[i] = next_string(&cursor, end)) == NULL)
            return -EPROTO;
    return cursor == end ? 0 : -EPROTO;
}

/* Answer a request: the command's init's pid and a pidfd for it, or -errno. */
static void reply(int ctl, int32_t result, int pidfd)
{
    union { /* aligned for the cmsghdr in it */
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = &result, .iov_len = sizeof(result)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;

    if (pidfd >= 0) {
        struct cmsghdr *cmsg;
        memset(control.buf, 0, sizeof(control.buf));
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &pidfd, sizeof(int));
    }
    do {
        n = sendmsg(ctl, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
}

static void free_command(struct command *c)
{
    free(c->argv);
    free(c->envp);
    free(c->payload);
    for (int i = 0; i < HEEL_REQUEST_FDS; i++)
        if (c->fds[i] >= 0)
            close(c->fds[i]);
}

/* Read one request and start its command.  Returns 1 when the host has
 * gone away (end of file or a broken socket). */
static int serve_request(struct zygote *z)
{
    struct command c;
    long length;
    int err, pidfd;
    pid_t pid;

    memset(&c, 0, sizeof(c));
    for (int i = 0; i < HEEL_REQUEST_FDS; i++)
        c.fds[i] = -1;
    length = receive_header(z->ctl, c.fds);
    if (length == 0 || length == -ECONNRESET)
        return 1;
    if (length < 0) {
        /* A header heel cannot read leaves the stream out of step (its
         * payload may follow): only the host writes here, so end the
         * sandbox rather than guess. */
        reply(z->ctl, (int32_t)length, -1);
        return 1;
    }
    c.payload = malloc((size_t)length);
    if (c.payload == NULL) {
        err = -ENOMEM;
    } else if (read_full(z->ctl, c.payload, (size_t)length) != length) {
        free_command(&c);
        return 1; /* a request cut short: the host is gone or broken */
    } else {
        err = parse_request(&c, c.payload, (size_t)length);
    }
    if (err < 0) {
        reply(z->ctl, err, -1);
        free_command(&c);
        return 0;
    }

    pid = fork();
    if (pid < 0) {
        reply(z->ctl, -errno, -1);
        free_command(&c);
        return 0;
    }
    if (pid == 0)
        command_init(z, &c);
    if (z->ninits == z->cap) {
        size_t cap = z->cap ? z->cap * 2 : 64;
        pid_t *grown = realloc(z->inits, cap * sizeof(pid_t));
        if (grown == NULL) {
            /* Untracked it would be taken for an escapee: end it now. */
            kill(pid, SIGKILL);
            reply(z->ctl, -ENOMEM, -1);
            free_command(&c);
            return 0;
        }
        z->inits = grown;
        z->cap = cap;
    }
    z->inits[z->ninits++] = pid;
    pidfd = (int)syscall(__NR_pidfd_open, pid, 0);
    if (pidfd < 0) {
        /* The child is ours and not reaped: its pid is still its own. */
        err = -errno;
        kill(pid, SIGKILL);
        reply(z->ctl, err, -1);
    } else {
        reply(z->ctl, (int32_t)pid, pidfd);
        close(pidfd);
    }
    free_command(&c);
    return 0;
}

/* Reap what has exited among heel-init's children, forgetting the commands'
 * inits among them: at most REAP_PER_TURN, so that children that keep
 * exiting (orphans of a fork bomb whose init was killed, without a pid
 * namespace) cannot keep heel-init from the host's requests.  Returns
 * nonzero when there may be more. */
static int reap_zygote(struct zygote *z)
{
    pid_t pid;
    int n = 0;

    while (n < REAP_PER_TURN && (pid = waitpid(-1, NULL, WNOHANG)) > 0) {
        n++;
        for (size_t i = 0; i < z->ninits; i++) {
            if (z->inits[i] == pid) {
                z->inits[i] = z->inits[--z->ninits];
                break;
            }
        }
    }
    return n == REAP_PER_TURN;
}

/* A child of heel-init that is not a command's init is an orphan whose
 * init died before it (killed by the host after its grace time, or out of
 * kill rounds): it belongs to a command that has ended, so it dies too.
 * Its own children come to heel-init in turn, and go the same way at the
 * next SIGCHLD. */
static void kill_escapees(const struct zygote *z)
{
    pid_t children[CHILDREN_PER_ROUND];
    int n = list_children(children, CHILDREN_PER_ROUND);

    for (int i = 0; i < n; i++) {
        int known = 0;
        for (size_t k = 0; k < z->ninits && !known; k++)
            known = z->inits[k] == children[i];
        if (!known)
            kill(children[i], SIGKILL);
    }
}

int main(int argc, char **argv)
{
    struct zygote z;
    struct heel_seccomp_opts opts;
    struct sock_fprog filter;
    sigset_t handled;
    int flags, n;

    memset(&z, 0, sizeof(z));
    z.ctl = argc > 1 ? parse_decimal(argv[1]) : -1;
    /* No command may inherit the control socket.  Without a valid fd there
     * is nobody to tell about a bad usage. */
    if (z.ctl < 0 || fcntl(z.ctl, F_SETFD, FD_CLOEXEC) < 0)
        return EXIT_INIT_FAILED;
    flags = argc == 3 || argc == 4 ? parse_decimal(argv[2]) : -1;
    z.ipc_fd = argc == 4 ? parse_decimal(argv[3]) : -1;
    if (argc == 4 && (z.ipc_fd < 0 || fcntl(z.ipc_fd, F_SETFD, FD_CLOEXEC) < 0))
        fail(z.ctl, HEEL_STAGE_INIT, EINVAL, EXIT_INIT_FAILED);
    if (flags < 0 || (flags & ~(HEEL_INIT_PIDNS | HEEL_INIT_UNIX_SOCKETS | HEEL_INIT_INET_STREAM |
                                HEEL_INIT_NETLINK_ROUTE | HEEL_INIT_SCOPE | HEEL_INIT_NO_LISTEN |
                                HEEL_INIT_NO_BIND | HEEL_INIT_NO_FASTOPEN |
                                HEEL_INIT_UNIX_SEQPACKET)) != 0)
        fail(z.ctl, HEEL_STAGE_INIT, EINVAL, EXIT_INIT_FAILED);
    z.pidns = (flags & HEEL_INIT_PIDNS) != 0;
    z.own_domain = (flags & HEEL_INIT_SCOPE) != 0;
    if (z.own_domain) {
        z.landlock_abi = heel_landlock_abi();
        z.scope = z.landlock_abi >= 6 ? HEEL_LANDLOCK_SCOPES : 0;
    }
    /* kill(-1) is the pid-namespace shutdown; from anything but pid 1 it
     * would reach the user's processes outside the sandbox. */
    if (z.pidns && getpid() != 1)
        fail(z.ctl, HEEL_STAGE_INIT, EINVAL, EXIT_INIT_FAILED);

    /* The filter of heel-init and so of every command. */
    opts.allow_unix_sockets = (flags & HEEL_INIT_UNIX_SOCKETS) != 0;
    opts.allow_unix_seqpacket = (flags & HEEL_INIT_UNIX_SEQPACKET) != 0;
    opts.allow_inet_stream = (flags & HEEL_INIT_INET_STREAM) != 0;
    opts.allow_netlink_route = (flags & HEEL_INIT_NETLINK_ROUTE) != 0;
    opts.deny_listen = (flags & HEEL_INIT_NO_LISTEN) != 0;
    opts.deny_bind = (flags & HEEL_INIT_NO_BIND) != 0;
    opts.deny_fastopen = (flags & HEEL_INIT_NO_FASTOPEN) != 0;
    opts.deny_foreign_sched = !z.pidns;
    opts.deny_linger = z.ipc_fd >= 0;  /* see setsockopt_check in seccomp.c */
    n = heel_seccomp_build(&opts, filter_code, FILTER_CAP);
    if (n <= 0)
        fail(z.ctl, HEEL_STAGE_SECCOMP, n < 0 ? -n : EINVAL, EXIT_INIT_FAILED);
    filter.len = (unsigned short)n;
    filter.filter = (struct sock_filter *)filter_code;

    reset_signal_dispositions();
    handled_signals(&handled);
    if (sigprocmask(SIG_BLOCK, &handled, &z.orig_mask) < 0)
        fail(z.ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    z.sfd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC);
    if (z.sfd < 0)
        fail(z.ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    /* Not dumpable: commands run with our uid and Landlock domain, and must
     * not be able to read or write our memory through /proc/PID/mem (the
     * flag does not survive a command's exec). */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    if (!z.pidns && prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        fail(z.ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    /* What heel-init does from here on needs none of what the filter
     * refuses: install it now, once, for every command it will start.  (It
     * has no capability since its exec: spawn.c saw to that.) */
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &filter) < 0)
        fail(z.ctl, HEEL_STAGE_SECCOMP, errno, EXIT_INIT_FAILED);
    send_msg(z.ctl, HEEL_MSG_STARTED, getpid(), 0);

    for (int backlog = 0;;) {
        struct pollfd fds[2] = {
            {.fd = z.sfd, .events = POLLIN},
            {.fd = z.ctl, .events = POLLIN},
        };
        /* With zombies left from the last turn, only look for requests. */
        if (poll(fds, 2, backlog ? 0 : -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents != 0 || backlog) {
            struct signalfd_siginfo info[8];
            ssize_t got;
            int host_gone = 0;
            /* SIGCHLD, and without a pid namespace SIGTERM: the parent-death
             * signal spawn.c asks for then (heel._spawn), the host's end. */
            while ((got = read(z.sfd, info, sizeof(info))) > 0)
                for (ssize_t i = 0; i < got / (ssize_t)sizeof(info[0]); i++)
                    host_gone |= !z.pidns && info[i].ssi_signo == SIGTERM;
            backlog = reap_zygote(&z);   /* commands' inits, and orphans */
            kill_escapees(&z);
            if (host_gone)
                break;
        }
        if (fds[1].revents != 0 && serve_request(&z))
            break;
    }
    /* The host is gone: so is the sandbox. */
    if (z.pidns)
        kill_namespace();
    else
        kill_descendants(NULL);
    return 0;
}
