/*
 * landlock.c - Landlock rulesets, built in the parent.
 *
 * The ruleset fd is created once per sandbox configuration; every child only
 * calls landlock_restrict_self() on it.  Structures and syscall numbers are
 * defined here so the build does not depend on <linux/landlock.h>, which
 * older build images lack.  Which rights to handle for the running ABI is
 * decided in Python (heel/_landlock.py); this file only talks to the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "heel.h"
#include "syscalls.h"

#define HEEL_LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#define HEEL_LANDLOCK_RULE_PATH_BENEATH 1
#define HEEL_LANDLOCK_RULE_NET_PORT 2

/* struct landlock_ruleset_attr: a kernel that knows fewer fields accepts the
 * larger struct as long as the fields it does not know are zero. */
struct heel_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct heel_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

struct heel_net_port_attr {
    uint64_t allowed_access;
    uint64_t port;
};

int heel_landlock_abi(void)
{
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0,
                       HEEL_LANDLOCK_CREATE_RULESET_VERSION);
    return abi < 0 ? -errno : (int)abi;
}

int heel_landlock_create(uint64_t handled_fs, uint64_t handled_net, uint64_t scoped)
{
    struct heel_ruleset_attr attr = {
        .handled_access_fs = handled_fs,
        .handled_access_net = handled_net,
        .scoped = scoped,
    };
    /* Pass only as much of the struct as the fields in use need, so an older
     * kernel sees a struct it knows. */
    size_t size = sizeof(attr);
    if (!scoped) {
        size = offsetof(struct heel_ruleset_attr, scoped);
        if (!handled_net)
            size = offsetof(struct heel_ruleset_attr, handled_access_net);
    }
    long fd = syscall(__NR_landlock_create_ruleset, &attr, size, 0);
    if (fd < 0)
        return -errno;
    /* The kernel sets O_CLOEXEC on ruleset fds already; make sure. */
    fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    return (int)fd;
}

/* An O_PATH fd of the absolute ``path``, one component at a time, none of
 * them a symbolic link (ELOOP): what openat2(RESOLVE_NO_SYMLINKS) does, for
 * a host that hides openat2 (its own seccomp policy, or heel's: a heel run
 * inside a sandbox).  -errno on failure. */
static int open_walking(const char *path)
{
    char copy[PATH_MAX];
    size_t length = strlen(path);
    if (path[0] != '/' || length >= sizeof(copy))
        return -EINVAL;
    memcpy(copy, path, length + 1);
    int dir = open("/", O_PATH | O_CLOEXEC | O_DIRECTORY);
    if (dir < 0)
        return -errno;
    char *save = NULL;
    for (char *part = strtok_r(copy, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
        if (strcmp(part, ".") == 0 || strcmp(part, "..") == 0) {
            close(dir);
            return -EINVAL;  /* the paths come resolved: none of these */
        }
        int next = openat(dir, part, O_PATH | O_CLOEXEC | O_NOFOLLOW);
        int err = errno;
        close(dir);
        if (next < 0)
            return -err;
        struct stat st;
        if (fstat(next, &st) < 0 || S_ISLNK(st.st_mode)) {
            close(next);
            return -ELOOP;
        }
        dir = next;
    }
    return dir;
}

/* Python plans each rule on a path it has resolved (no symbolic link in
 * it), and the ruleset is built a few milliseconds later.  A process that
 * may write a directory on the way (another sandbox, given it writable) can
 * swap a component for a link in between, so the path is opened without
 * following any: a link there now fails with ELOOP instead of granting
 * where it points.  openat2() is older (5.6) than Landlock (5.13); the walk
 * is kept for a host whose own seccomp policy hides openat2. */
int heel_landlock_add_path(int ruleset_fd, const char *path, uint64_t allowed)
{
    struct heel_open_how how = {
        .flags = O_PATH | O_CLOEXEC,
        .resolve = HEEL_RESOLVE_NO_SYMLINKS | HEEL_RESOLVE_NO_MAGICLINKS,
    };
    int fd = (int)syscall(__NR_openat2, AT_FDCWD, path, &how, sizeof(how));
    if (fd < 0 && errno == ENOSYS) {
        fd = open_walking(path);
        if (fd < 0) {
            errno = -fd;
            fd = -1;
        }
    }
    if (fd < 0)
        return -errno;
    struct heel_path_beneath_attr attr = {
        .allowed_access = allowed,
        .parent_fd = fd,
    };
    long rc = syscall(__NR_landlock_add_rule, ruleset_fd,
                      HEEL_LANDLOCK_RULE_PATH_BENEATH, &attr, 0);
    int err = rc < 0 ? errno : 0;
    close(fd);
    return -err;
}

int heel_landlock_add_port(int ruleset_fd, uint64_t port, uint64_t allowed)
{
    struct heel_net_port_attr attr = {
        .allowed_access = allowed,
        .port = port,
    };
    long rc = syscall(__NR_landlock_add_rule, ruleset_fd,
                      HEEL_LANDLOCK_RULE_NET_PORT, &attr, 0);
    return rc < 0 ? -errno : 0;
}
