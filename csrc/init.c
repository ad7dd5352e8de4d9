/*
 * init.c - heel-init, the first process of every sandbox.
 *
 * The spawn trampoline (spawn.c) execs heel-init as its last step, so
 * heel-init runs under the same namespaces, Landlock domain, seccomp filter,
 * rlimits and no_new_privs as the command.  heel-init:
 *   - starts the command as its child and tells the host whether execve
 *     worked;
 *   - forwards the host's signals to the command;
 *   - reaps every process that ends up as its child;
 *   - when the command exits, or the host asks for it or goes away, kills
 *     every remaining process of the sandbox, and only then reports the
 *     command's wait status, so that "exited" means "nothing is left".
 *
 * Usage: heel-init CTL_FD FLAGS PROGRAM ARGV0 [ARGS...]
 * CTL_FD is the control socket (struct heel_msg both ways).  FLAGS holds
 * HEEL_INIT_PIDNS when heel-init is pid 1 of its own pid namespace; without
 * it heel-init becomes a child subreaper instead.  Exit status: 0 after a
 * shutdown, 125 when heel-init itself failed, 127 when the command could not
 * be executed.  The host reads the details from the messages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "heel.h"

#define EXIT_INIT_FAILED 125
#define EXIT_EXEC_FAILED 127

/* The search path when the command's environment has no PATH. */
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

/* Subreaper mode gives up after this many kill rounds (about 10 s when
 * every round has to pause 1 ms) rather than hang on a process that cannot
 * be killed: one stuck in uninterruptible sleep, or one outrunning SIGKILL
 * with forks. */
#define MAX_KILL_ROUNDS 10000

/* Signals the host may send to heel-init, passed on to the command. */
static const int forwarded_signals[] = {
    SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGALRM, SIGCONT,
};

struct sandbox {
    int ctl;            /* the control socket */
    int pidns;          /* heel-init is pid 1 of its own pid namespace */
    pid_t command;
    int command_reaped; /* command_status is valid; command's pid may be recycled */
    int command_status;
};

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
    exit(exit_status);
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
 * kernel reap the command behind our back, and the command must start from
 * the defaults, so heel-init does not rely on its caller having reset them. */
static void reset_signal_dispositions(void)
{
    struct sigaction dfl;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL); /* EINVAL for SIGKILL, SIGSTOP, libc's own: fine */
}

/* execvp without glibc's extras, in the forked child.  Returns the errno to
 * report.  As execvp: a PROGRAM with a '/' is used as is; otherwise each PATH
 * entry is tried in order (an empty entry is the current directory), a
 * missing file moves on to the next entry, EACCES is remembered and reported
 * only if nothing else works, and any other error stops the search.  Unlike
 * glibc, a file the kernel cannot execute (ENOEXEC: no #! line) is not
 * retried with /bin/sh: that would be a guess about an untrusted file, and
 * the user can name the interpreter. */
static int exec_command(const char *program, char *const argv[])
{
    const char *path = getenv("PATH");
    size_t program_len = strlen(program);
    int err = ENOENT, seen_eacces = 0;
    char candidate[PATH_MAX];
    const char *dir, *dir_end;

    if (strchr(program, '/') != NULL) {
        execve(program, argv, environ);
        return errno;
    }
    if (program_len == 0)
        return ENOENT;
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
            execve(candidate, argv, environ);
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

/* Fork and exec the command.  Returns its pid once execve has succeeded; on
 * any failure reports it and exits.  A close-on-exec pipe tells the two
 * apart: end of file with no data means execve went through, otherwise the
 * child wrote its errno before exiting. */
static pid_t start_command(int ctl, const sigset_t *orig_mask, const char *program,
                           char *const argv[])
{
    int exec_pipe[2], err;
    ssize_t n;
    pid_t pid;

    if (pipe2(exec_pipe, O_CLOEXEC) < 0)
        fail(ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    pid = fork();
    if (pid < 0)
        fail(ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    if (pid == 0) {
        close(exec_pipe[0]);
        sigprocmask(SIG_SETMASK, orig_mask, NULL);
        /* A session and process group of its own: heel-init's stay apart
         * from the command's job control, and the group is a handle on the
         * command's processes when /proc cannot list them.  setsid() fails
         * (EPERM) only when the caller's pid is already a process group's
         * id, which a fresh child's is not. */
        setsid();
        err = exec_command(program, argv);
        while (write(exec_pipe[1], &err, sizeof(err)) < 0 && errno == EINTR)
            continue;
        _exit(EXIT_EXEC_FAILED);
    }

    close(exec_pipe[1]);
    n = read_full(exec_pipe[0], &err, sizeof(err));
    if (n < 0)
        err = errno;
    close(exec_pipe[0]);
    if (n == 0)
        return pid;

    /* The child is not reaped yet, so its pid cannot have been recycled. */
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        continue;
    if (n == (ssize_t)sizeof(err))
        fail(ctl, HEEL_STAGE_EXEC, err, EXIT_EXEC_FAILED);
    /* A pipe write this small is atomic, so a short read cannot happen. */
    fail(ctl, HEEL_STAGE_INIT, n < 0 ? err : EIO, EXIT_INIT_FAILED);
}

/* Reap every child that has exited, without blocking.  Returns how many
 * were reaped, or -1 when heel-init has no child left at all. */
static int reap_exited(struct sandbox *sb)
{
    int reaped = 0, status;
    pid_t pid;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == sb->command) {
            sb->command_status = status;
            sb->command_reaped = 1;
        }
        reaped++;
    }
    if (pid < 0 && errno == ECHILD)
        return -1;
    return reaped;
}

/* Drain the signalfd.  Returns 1 once the command has exited. */
static int handle_signals(struct sandbox *sb, int sfd)
{
    struct signalfd_siginfo info[8];
    ssize_t n;

    for (;;) {
        n = read(sfd, info, sizeof(info));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0; /* EAGAIN: drained */
        for (size_t i = 0; i < (size_t)n / sizeof(info[0]); i++) {
            if (info[i].ssi_signo == SIGCHLD) {
                reap_exited(sb);
                if (sb->command_reaped)
                    return 1;
            } else {
                /* The command is reaped only just above, and the sandbox
                 * ends right then, so this pid still names the command
                 * (at worst a zombie), never a recycled pid. */
                kill(sb->command, (int)info[i].ssi_signo);
            }
        }
    }
}

/* A message from the host, read in as many pieces as the socket delivers. */
struct ctl_reader {
    struct heel_msg msg;
    size_t have;
};

/* Read what the control socket has.  Returns 1 when the host asked for the
 * end (HEEL_MSG_KILL) or went away (end of file, error, hang-up). */
static int handle_ctl(int ctl, struct ctl_reader *r)
{
    ssize_t n = read(ctl, (char *)&r->msg + r->have, sizeof(r->msg) - r->have);

    if (n < 0)
        return errno != EINTR && errno != EAGAIN;
    if (n == 0)
        return 1;
    r->have += (size_t)n;
    if (r->have < sizeof(r->msg))
        return 0;
    r->have = 0;
    return r->msg.kind == HEEL_MSG_KILL; /* other kinds mean nothing to heel-init */
}

/* Serve signals and the host until the sandbox must end. */
static void run_until_end(struct sandbox *sb, int sfd)
{
    struct pollfd fds[2] = {
        {.fd = sfd, .events = POLLIN},
        {.fd = sb->ctl, .events = POLLIN},
    };
    struct ctl_reader reader = {.have = 0};

    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return; /* heel-init can no longer watch the sandbox: end it */
        }
        /* Signals first: the command's exit is reported if it came first. */
        if (fds[0].revents != 0 && handle_signals(sb, sfd))
            return;
        /* Any event, POLLHUP and POLLERR included, shows in the read. */
        if (fds[1].revents != 0 && handle_ctl(sb->ctl, &reader))
            return;
    }
}

/* Pid-namespace mode.  kill(-1) from pid 1 reaches every other process of
 * the namespace and nothing outside it; a process being killed cannot fork
 * any more, so one call suffices.  Everything is SIGKILLed, so a blocking
 * wait ends. */
static void kill_namespace(struct sandbox *sb)
{
    int status;
    pid_t pid;

    kill(-1, SIGKILL);
    for (;;) {
        pid = waitpid(-1, &status, 0);
        if (pid > 0 && pid == sb->command) {
            sb->command_status = status;
            sb->command_reaped = 1;
        } else if (pid < 0 && errno != EINTR) {
            return; /* ECHILD: nothing is left */
        }
    }
}

/* Without /proc, kill what can be named safely.  The command's pid is used
 * only while it is unreaped, and its process group only while one of
 * heel-init's children is still in it: either way the id is held and cannot
 * have been recycled by an unrelated process.  An orphan that left the group
 * (setsid) cannot be reached this way.  Returns how many targets there were. */
static int kill_command_group(const struct sandbox *sb)
{
    siginfo_t info;
    int targets = 0;

    if (!sb->command_reaped) {
        kill(sb->command, SIGKILL);
        targets++;
    }
    if (waitid(P_PGID, (id_t)sb->command, &info, WEXITED | WNOHANG | WNOWAIT) == 0) {
        kill(-sb->command, SIGKILL);
        targets++;
    }
    return targets;
}

/* SIGKILL heel-init's direct children, as /proc lists them.  Nothing is
 * reaped while the list is used, so each pid in it still names that child
 * (a zombie keeps its pid), never a recycled one.  Returns how many
 * targets there were. */
static int kill_children(const struct sandbox *sb)
{
    char path[64], buf[4096];
    long long pid = 0;
    int targets = 0;
    ssize_t len;
    int fd;

    /* Single-threaded: heel-init's only thread has tid == pid. */
    snprintf(path, sizeof(path), "/proc/self/task/%d/children", (int)getpid());
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kill_command_group(sb);
    len = read_full(fd, buf, sizeof(buf));
    close(fd);
    if (len < 0)
        return kill_command_group(sb);
    /* "PID PID ... ": each pid ends with a space.  One cut off by a full
     * buffer has none yet and is left for the next round. */
    for (ssize_t i = 0; i < len; i++) {
        char c = buf[i];
        if (c == ' ') {
            if (pid > 0 && pid <= INT_MAX) {
                kill((pid_t)pid, SIGKILL);
                targets++;
            }
            pid = 0;
        } else if (pid >= 0 && c >= '0' && c <= '9' && pid <= INT_MAX) {
            pid = pid * 10 + (c - '0');
        } else {
            pid = -1; /* not a pid: skip to the next space */
        }
    }
    return targets;
}

/* Subreaper mode.  Killing a process orphans its children, which the
 * kernel hands to heel-init, the subreaper, for the next round; the rounds
 * go on until heel-init has no child at all.  They stop early when a round
 * has nothing to kill and nothing to reap: /proc lists every child, zombies
 * included, so that only happens without /proc, once the children left are
 * out of the fallback's reach. */
static void kill_descendants(struct sandbox *sb)
{
    const struct timespec pause = {.tv_sec = 0, .tv_nsec = 1000 * 1000};

    for (int round = 0; round < MAX_KILL_ROUNDS; round++) {
        int targets, reaped;

        targets = kill_children(sb);
        reaped = reap_exited(sb);
        if (reaped < 0 || (targets == 0 && reaped == 0))
            return;
        /* Nothing had died yet: give SIGKILL a moment rather than spin. */
        if (reaped == 0)
            nanosleep(&pause, NULL);
    }
}

int main(int argc, char **argv)
{
    struct sandbox sb;
    sigset_t handled, orig_mask;
    int ctl, flags, sfd, report;

    ctl = argc > 1 ? parse_decimal(argv[1]) : -1;
    /* The command must not inherit the control socket.  Without a valid fd
     * there is nobody to tell about a bad usage. */
    if (ctl < 0 || fcntl(ctl, F_SETFD, FD_CLOEXEC) < 0)
        return EXIT_INIT_FAILED;
    flags = argc > 2 ? parse_decimal(argv[2]) : -1;
    if (argc < 5 || flags < 0 || (flags & ~HEEL_INIT_PIDNS) != 0)
        fail(ctl, HEEL_STAGE_INIT, EINVAL, EXIT_INIT_FAILED);
    /* kill(-1) is the pid-namespace shutdown; from anything but pid 1 it
     * would reach the user's processes outside the sandbox. */
    if ((flags & HEEL_INIT_PIDNS) && getpid() != 1)
        fail(ctl, HEEL_STAGE_INIT, EINVAL, EXIT_INIT_FAILED);

    memset(&sb, 0, sizeof(sb));
    sb.ctl = ctl;
    sb.pidns = (flags & HEEL_INIT_PIDNS) != 0;

    /* Handled signals are blocked and read from a signalfd.  As pid 1 this
     * is also what lets them in at all: the kernel drops signals with the
     * default action that are sent to a namespace's init, but a blocked
     * signal is queued. */
    reset_signal_dispositions();
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    for (size_t i = 0; i < sizeof(forwarded_signals) / sizeof(forwarded_signals[0]); i++)
        sigaddset(&handled, forwarded_signals[i]);
    if (sigprocmask(SIG_BLOCK, &handled, &orig_mask) < 0)
        fail(ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    sfd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0)
        fail(ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);
    /* Not dumpable: the command runs with our uid and Landlock domain, and
     * must not be able to read or write our memory through /proc/1/mem
     * (the flag does not survive the command's exec). */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* Without a pid namespace, orphans would go to an init outside the
     * sandbox; as a subreaper heel-init gets them, and can kill them. */
    if (!sb.pidns && prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        fail(ctl, HEEL_STAGE_INIT, errno, EXIT_INIT_FAILED);

    sb.command = start_command(ctl, &orig_mask, argv[3], &argv[4]);
    send_msg(ctl, HEEL_MSG_STARTED, sb.command, 0);

    run_until_end(&sb, sfd);
    /* Only an exit seen before the shutdown is the command's own; one
     * caused by the shutdown (the host's end) is not reported. */
    report = sb.command_reaped;
    if (sb.pidns)
        kill_namespace(&sb);
    else
        kill_descendants(&sb);
    if (report)
        send_msg(ctl, HEEL_MSG_EXITED, sb.command_status, 0);
    return 0;
}
