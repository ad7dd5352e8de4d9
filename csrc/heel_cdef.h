/* Declarations for cffi's cdef (no preprocessor lines allowed): the same
 * as heel.h, with "..." where the compiler fills in the values. */

const char *heel_native_version(void);

int heel_landlock_abi(void);
int heel_landlock_create(uint64_t handled_fs, uint64_t handled_net, uint64_t scoped);
int heel_landlock_add_path(int ruleset_fd, const char *path, uint64_t allowed);
int heel_landlock_add_port(int ruleset_fd, uint64_t port, uint64_t allowed);

uint32_t heel_seccomp_arch(void);

enum heel_mount_kind {
    HEEL_MNT_KEEP_RW, HEEL_MNT_READONLY, HEEL_MNT_BIND, HEEL_MNT_PROC, HEEL_MNT_TMPFS,
    HEEL_MNT_DEVPTS, HEEL_MNT_PROC_KERNEL_RO, ...
};

struct heel_mount_op {
    int kind;
    const char *source;
    const char *path;
    uint64_t access;
    int idmap;
};

struct heel_spawn_plan {
    int init_fd;
    char *const *argv;
    char *const *envp;
    const char *cwd;
    const int *fds;
    int nfds;
    int report_fd;
    int clone_flags;
    const char *uid_map;
    const char *gid_map;
    const struct heel_mount_op *mounts;
    int nmounts;
    int readonly_root;
    int landlock_fd;
    int pdeathsig;
    int userns_fd;
    int proxy_port;
};

enum heel_stage {
    HEEL_STAGE_CLONE, HEEL_STAGE_SIGNALS, HEEL_STAGE_USERNS, HEEL_STAGE_MOUNT,
    HEEL_STAGE_FDS, HEEL_STAGE_SETSID, HEEL_STAGE_CHDIR, HEEL_STAGE_RLIMIT,
    HEEL_STAGE_CAPS, HEEL_STAGE_NO_NEW_PRIVS, HEEL_STAGE_LANDLOCK,
    HEEL_STAGE_SECCOMP, HEEL_STAGE_EXEC_INIT, HEEL_STAGE_INIT, HEEL_STAGE_EXEC,
    HEEL_STAGE_REQUEST, HEEL_STAGE_NETWORK, ...
};

enum heel_msg_kind {
    HEEL_MSG_ERROR, HEEL_MSG_STARTED, HEEL_MSG_EXITED, HEEL_MSG_KILL, HEEL_MSG_LISTENER, HEEL_MSG_PTMX, HEEL_MSG_SIGNAL, ...
};

struct heel_msg {
    int32_t kind;
    int32_t a;
    int32_t b;
};

#define HEEL_INIT_PIDNS ...
#define HEEL_INIT_UNIX_SOCKETS ...
#define HEEL_INIT_INET_STREAM ...
#define HEEL_INIT_NETLINK_ROUTE ...
#define HEEL_INIT_SCOPE ...
#define HEEL_INIT_NO_LISTEN ...
#define HEEL_INIT_NO_BIND ...
#define HEEL_INIT_NO_FASTOPEN ...
#define HEEL_INIT_UNIX_SEQPACKET ...
#define HEEL_REQUEST_CTTY ...
#define HEEL_REQUEST_FDS ...
#define HEEL_REQUEST_MAX ...
#define HEEL_IPC_FD ...

struct heel_request_head {
    uint32_t nargv;
    uint32_t nenv;
    uint32_t nrlimits;
    uint32_t flags;
};

struct heel_rlimit {
    int32_t resource;
    uint32_t reserved;
    uint64_t soft;
    uint64_t hard;
};

int heel_spawn(const struct heel_spawn_plan *plan, int *pidfd_out);
int heel_userns_create(const char *uid_map, const char *gid_map);

/* Relay */
struct heel_relay;
struct heel_relay_done {
    uint64_t id;
    uint64_t a_to_b;
    uint64_t b_to_a;
    int32_t error;
};
int heel_relay_start(struct heel_relay **out);
int heel_relay_notify_fd(struct heel_relay *r);
int heel_relay_add(struct heel_relay *r, int fd_a, int fd_b, uint64_t id);
int heel_relay_cancel(struct heel_relay *r, uint64_t id);
void heel_relay_stop(struct heel_relay *r);
