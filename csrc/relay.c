/*
 * relay.c - the proxy's tunnel relay.
 *
 * Once the proxy has answered a CONNECT (or SOCKS5) request, the tunnel's
 * bytes need no more Python: they go socket -> pipe -> socket with splice(),
 * so the kernel moves page references and no byte is copied to user space.
 * Each relay is one thread with one epoll set; heel/_relay.py runs a pool
 * of them and gives each new tunnel to the one that carries fewest.
 *
 * Ownership and threads.  The relay thread alone touches tunnels, the epoll
 * interest of their sockets and the list of unreported completions.  Other
 * threads (Python's) only append requests (add, cancel, stop) to a queue
 * under `lock` and then poke the eventfd; everything else in struct
 * heel_relay is written before pthread_create() and only read afterwards,
 * and heel_relay_stop() frees nothing before pthread_join() returns.  So the
 * only shared mutable state is behind the mutex.
 *
 * Per direction ("flow") of a tunnel there is a pipe.  A source is watched
 * for EPOLLIN only while its pipe has room and a destination for EPOLLOUT
 * only while its pipe holds bytes, so a tunnel whose reader stalls fills its
 * pipe and the socket buffers behind it, and then costs nothing: the
 * sender's TCP window closes, and other tunnels never wait for it.
 *
 * Edge-triggered, measured against level-triggered on 2 cores (1 GiB over 1
 * and 32 streams, benchmarks/bench_relay.py, relay/direct medians: ET 0.79x
 * and 0.90x, LT 0.81x and 0.87x): the same within this machine's noise, so
 * the choice rests on correctness.  With level triggering a pipe can be full
 * in slots while our byte count says it has room (splice fills one slot per
 * page fragment), and a readable source then wakes the thread over and over
 * while its destination is blocked; likewise a socket whose both halves
 * are shut reports EPOLLHUP without end.  Edge triggering has neither spin,
 * at the price of the rule that every wait follows an EAGAIN (or a fresh
 * EPOLL_CTL_MOD, which re-checks readiness), and of a ready list for flows
 * that stopped early to let other tunnels run.
 *
 * Completions are fixed-size records written to a pipe that Python reads.
 * A record is smaller than PIPE_BUF, so each write is whole.  When the pipe
 * is full (Python is not reading: about 32768 records behind with the 1 MiB
 * the relay asks for), records wait in order in memory - in the ended
 * tunnels themselves, so this needs no allocation - and the thread watches
 * the pipe for room; it never blocks on it.
 *
 * Every fd made here is close-on-exec, and so are the sockets handed over:
 * heel's children are cloned and exec'd, and must not inherit a tunnel.
 * All signals are blocked in the relay thread: a splice() into a reset
 * socket raises SIGPIPE at the writing thread, and the process's handlers
 * (Python's) belong on its main thread anyway.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "heel.h"

/* Largest pipe per flow; smaller when the system refuses (pipe-max-size,
 * pipe-user-pages-soft for a user without CAP_SYS_RESOURCE).  Measured with
 * 32 streams: 64 KiB pipes 0.75x direct, 256 KiB about 0.7-0.8x, 1 MiB
 * 0.87-0.90x; capping each splice below the pipe's room gained nothing. */
#define RELAY_PIPE_SIZE (1 << 20)
#define RELAY_PIPE_DEFAULT (1 << 16)
#define RELAY_DONE_PIPE_SIZE (1 << 20)
/* Bytes a flow may move in one turn before other tunnels get theirs. */
#define RELAY_TURN_BYTES (4u << 20)
#define RELAY_MAX_EVENTS 128
#define RELAY_SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

struct relay_tunnel;

/* What an epoll event points to: a tunnel's socket, or the relay's own fds
 * (tunnel NULL). */
struct relay_endpoint {
    struct relay_tunnel *tunnel;
    int fd;
    uint32_t interest;       /* EPOLLIN/EPOLLOUT as registered with epoll */
};

/* One direction of a tunnel: src -> pipe -> dst. */
struct relay_flow {
    int src, dst;
    int pipe_rd, pipe_wr;
    size_t pipe_size;
    size_t in_pipe;          /* bytes read from src, not yet written to dst */
    uint64_t delivered;      /* bytes written to dst */
    bool src_eof;
    bool finished;           /* EOF passed on: dst was shut down for writing */
    bool urgent;             /* src has reported urgent data (EPOLLPRI) not yet passed on */
};

/* A request from another thread: add `tunnel`, or cancel `id` (tunnel NULL). */
struct relay_request {
    struct relay_request *next;
    uint64_t id;
    struct relay_tunnel *tunnel;
};

struct relay_tunnel {
    uint64_t id;
    struct relay_endpoint end[2];     /* a, b */
    struct relay_flow flow[2];        /* a -> b, b -> a */
    struct relay_request add_request; /* so that queueing an add cannot fail */
    struct relay_tunnel *prev, *next; /* the active list, or the finished list */
    struct relay_tunnel *ready_next;
    bool ready;                       /* on the ready list: pump again without an event */
    bool ended;
    int error;
};

struct relay_list {
    struct relay_tunnel *head, *tail;
};

struct heel_relay {
    int epoll_fd;
    int wake_fd;                      /* eventfd: requests are queued */
    int done_rd, done_wr;             /* the completion pipe */
    struct relay_endpoint wake_end, done_end;
    pthread_t thread;

    pthread_mutex_t lock;             /* guards requests and stopping */
    struct relay_request *requests, *requests_tail;
    bool stopping;

    /* The relay thread's own. */
    struct relay_list active;
    struct relay_list finished;       /* ended, record not yet written */
    struct relay_tunnel *ready;
    bool done_watched;                /* done_wr is in the epoll set */
};

/* ---- lists ------------------------------------------------------------ */

static void list_append(struct relay_list *list, struct relay_tunnel *t)
{
    t->next = NULL;
    t->prev = list->tail;
    if (list->tail)
        list->tail->next = t;
    else
        list->head = t;
    list->tail = t;
}

static void list_remove(struct relay_list *list, struct relay_tunnel *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        list->head = t->next;
    if (t->next)
        t->next->prev = t->prev;
    else
        list->tail = t->prev;
    t->prev = t->next = NULL;
}

/* ---- setting a tunnel up (caller's thread) ---------------------------- */

static void close_if_open(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* A non-blocking, close-on-exec stream socket, or an errno. */
static int prepare_socket(int fd)
{
    int type;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return errno;
    if (type != SOCK_STREAM)
        return EPROTOTYPE;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return errno;
    /* TCP urgent data stays in the byte stream (see flow_pass_urgent). */
    int inline_urgent = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &inline_urgent, sizeof(inline_urgent)) < 0)
        return errno;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return errno;
    return 0;
}

/* The largest pipe the system grants up to RELAY_PIPE_SIZE; a refusal only
 * means a slower tunnel, so it is not an error. */
static int open_flow_pipe(struct relay_flow *f)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
        return errno;
    f->pipe_rd = fds[0];
    f->pipe_wr = fds[1];
    for (int size = RELAY_PIPE_SIZE; size > RELAY_PIPE_DEFAULT; size /= 2)
        if (fcntl(f->pipe_wr, F_SETPIPE_SZ, size) >= 0)
            break;
    int size = fcntl(f->pipe_wr, F_GETPIPE_SZ);
    f->pipe_size = size > 0 ? (size_t)size : RELAY_PIPE_DEFAULT;
    return 0;
}

static void close_tunnel_fds(struct relay_tunnel *t)
{
    for (int i = 0; i < 2; i++) {
        close_if_open(&t->end[i].fd);
        close_if_open(&t->flow[i].pipe_rd);
        close_if_open(&t->flow[i].pipe_wr);
    }
}

static int tunnel_new(struct relay_tunnel **out, int fd_a, int fd_b, uint64_t id)
{
    if (fd_a < 0 || fd_b < 0 || fd_a == fd_b)
        return EBADF;
    struct relay_tunnel *t = calloc(1, sizeof(*t));
    if (!t)
        return ENOMEM;
    t->id = id;
    int fds[2] = {fd_a, fd_b};
    for (int i = 0; i < 2; i++) {
        t->end[i] = (struct relay_endpoint){.tunnel = t, .fd = fds[i]};
        t->flow[i] = (struct relay_flow){.src = fds[i], .dst = fds[1 - i],
                                         .pipe_rd = -1, .pipe_wr = -1};
    }
    int err = 0;
    for (int i = 0; i < 2 && !err; i++)
        err = prepare_socket(fds[i]);
    for (int i = 0; i < 2 && !err; i++)
        err = open_flow_pipe(&t->flow[i]);
    if (err) {
        /* The pipes made so far only: fd_a and fd_b are the caller's to
         * close (heel_relay_add does).  Closed here too, the caller's close
         * came second, and in a threaded host it could take an fd another
         * thread had opened in between. */
        t->end[0].fd = t->end[1].fd = -1;
        close_tunnel_fds(t);
        free(t);
        return err;
    }
    *out = t;
    return 0;
}

/* ---- moving bytes (relay thread) -------------------------------------- */

static bool flow_wants_input(const struct relay_flow *f)
{
    return !f->src_eof && f->in_pipe < f->pipe_size;
}

/* splice() from a TCP socket stops at the urgent mark (tcp_read_sock()
 * reads nothing past it until recv() has), and says EAGAIN there, or 0 once
 * the peer's FIN has come too: a sender's one send(MSG_OOB) stalled its
 * tunnel, and at its end of file the rest of the stream was dropped and the
 * end passed on as a clean one (found by review).  The sockets keep urgent
 * data inline (SO_OOBINLINE, prepare_socket), so at the mark the urgent
 * byte is the next byte of the stream: copy it into the pipe with recv()
 * (peeked first, so that a full pipe loses nothing), and splice() goes on
 * past it.  The byte reaches dst as ordinary data: a tunnel is a byte
 * stream.  Returns 1 when it moved the byte, 0 when src is not at the mark,
 * -EAGAIN, or -errno. */
static ssize_t flow_pass_urgent(struct relay_flow *f)
{
    int at_mark = 0;
    char byte;
    ssize_t n;

    if (ioctl(f->src, SIOCATMARK, &at_mark) < 0)
        /* A socket without urgent data at all (AF_UNIX without
         * CONFIG_AF_UNIX_OOB): never at a mark. */
        return errno == ENOTTY || errno == EINVAL || errno == EOPNOTSUPP ? 0 : -errno;
    if (!at_mark)
        return 0;
    do
        n = recv(f->src, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n == 0)
        return 0;
    do
        n = write(f->pipe_wr, &byte, 1);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;   /* EAGAIN: the pipe is full, a drain makes room */
    do
        n = recv(f->src, &byte, 1, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n != 1)   /* the byte just peeked: cannot happen */
        return n < 0 ? -errno : -EIO;
    f->urgent = false;   /* another urgent byte comes with an EPOLLPRI of its own */
    f->in_pipe += 1;
    return 1;
}

/* One splice from src into the pipe: bytes moved (0 at EOF), -EAGAIN, or
 * -errno. */
static ssize_t flow_fill(struct relay_flow *f)
{
    ssize_t n;
    do
        n = splice(f->src, NULL, f->pipe_wr, NULL, f->pipe_size - f->in_pipe,
                   RELAY_SPLICE_FLAGS);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN)
        return -errno;
    /* At the mark: EAGAIN once EPOLLPRI has told us of urgent data, and an
     * end of file always (the FIN may have come with the urgent byte, before
     * its EPOLLPRI was read; an end of file comes once per flow). */
    if (n == 0 || (n < 0 && f->urgent)) {
        ssize_t moved = flow_pass_urgent(f);
        if (moved != 0)
            return moved;
    }
    if (n < 0)
        return -EAGAIN;
    if (n == 0)
        f->src_eof = true;
    f->in_pipe += n;
    return n;
}

static ssize_t flow_drain(struct relay_flow *f)
{
    ssize_t n;
    do
        n = splice(f->pipe_rd, NULL, f->dst, NULL, f->in_pipe, RELAY_SPLICE_FLAGS);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    f->in_pipe -= n;
    f->delivered += n;
    return n;
}

enum pump_outcome { PUMP_IDLE, PUMP_MORE };

/* Move bytes until both ends would block (the edge-triggered contract), or
 * the turn is used up (PUMP_MORE: the caller comes back without an event).
 * Returns a pump_outcome or -errno. */
static int flow_pump(struct relay_flow *f)
{
    size_t moved = 0;
    for (;;) {
        bool progress = false;
        if (flow_wants_input(f)) {
            ssize_t n = flow_fill(f);
            if (n < 0 && n != -EAGAIN)
                return (int)n;
            progress |= n >= 0;
        }
        if (f->in_pipe > 0) {
            ssize_t n = flow_drain(f);
            if (n < 0 && n != -EAGAIN)
                return (int)n;
            if (n > 0) {
                progress = true;
                moved += n;
            }
        }
        if (f->src_eof && f->in_pipe == 0 && !f->finished) {
            /* The source is done and every byte arrived: pass the EOF on,
             * leaving the other direction open. */
            if (shutdown(f->dst, SHUT_WR) < 0)
                return -errno;
            f->finished = true;
        }
        if (!progress)
            return PUMP_IDLE;
        if (moved >= RELAY_TURN_BYTES)
            return PUMP_MORE;
    }
}

/* ---- tunnel state (relay thread) -------------------------------------- */

static uint32_t endpoint_wanted(const struct relay_tunnel *t, int side)
{
    const struct relay_flow *out = &t->flow[side];     /* side is its source */
    const struct relay_flow *in = &t->flow[1 - side];  /* side is its destination */
    return (flow_wants_input(out) ? EPOLLIN | EPOLLPRI : 0) | (in->in_pipe > 0 ? EPOLLOUT : 0);
}

static void tunnel_end(struct heel_relay *r, struct relay_tunnel *t, int error)
{
    if (t->ended)
        return;
    t->ended = true;
    t->error = error;
    for (int i = 0; i < 2; i++) {
        epoll_ctl(r->epoll_fd, EPOLL_CTL_DEL, t->end[i].fd, NULL);
        /* An aborted tunnel resets both connections: a peer must not take
         * a cut-off stream for a complete one. */
        if (error) {
            struct linger reset = {.l_onoff = 1, .l_linger = 0};
            setsockopt(t->end[i].fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
        }
    }
    close_tunnel_fds(t);
    list_remove(&r->active, t);
    list_append(&r->finished, t);
}

/* Bring epoll in line with what the tunnel waits for; only a change costs
 * a system call. */
static void tunnel_rearm(struct heel_relay *r, struct relay_tunnel *t)
{
    for (int side = 0; side < 2 && !t->ended; side++) {
        struct relay_endpoint *e = &t->end[side];
        uint32_t wanted = endpoint_wanted(t, side);
        if (wanted == e->interest)
            continue;
        struct epoll_event ev = {.events = wanted | EPOLLET, .data.ptr = e};
        if (epoll_ctl(r->epoll_fd, EPOLL_CTL_MOD, e->fd, &ev) < 0)
            tunnel_end(r, t, errno);
        else
            e->interest = wanted;
    }
}

static void tunnel_mark_ready(struct heel_relay *r, struct relay_tunnel *t)
{
    if (!t->ready) {
        t->ready = true;
        t->ready_next = r->ready;
        r->ready = t;
    }
}

/* Pump the flows named by `which` (bit i: flow i), then settle the tunnel:
 * finished, failed, or waiting for new events. */
static void tunnel_pump(struct heel_relay *r, struct relay_tunnel *t, unsigned which)
{
    bool more = false;
    for (int i = 0; i < 2 && !t->ended; i++) {
        if (!(which & (1u << i)))
            continue;
        int outcome = flow_pump(&t->flow[i]);
        if (outcome < 0)
            tunnel_end(r, t, -outcome);
        more |= outcome == PUMP_MORE;
    }
    if (t->ended)
        return;
    if (t->flow[0].finished && t->flow[1].finished) {
        tunnel_end(r, t, 0);
        return;
    }
    tunnel_rearm(r, t);
    /* Only live tunnels go on the ready list; run_ready() empties it before
     * report_finished() frees ended ones, so it never points at freed memory. */
    if (more && !t->ended)
        tunnel_mark_ready(r, t);
}

static void tunnel_register(struct heel_relay *r, struct relay_tunnel *t)
{
    list_append(&r->active, t);
    for (int side = 0; side < 2; side++) {
        struct relay_endpoint *e = &t->end[side];
        e->interest = endpoint_wanted(t, side);
        struct epoll_event ev = {.events = e->interest | EPOLLET, .data.ptr = e};
        if (epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, e->fd, &ev) < 0) {
            tunnel_end(r, t, errno);
            return;
        }
    }
}

static void endpoint_event(struct heel_relay *r, struct relay_endpoint *e, uint32_t events)
{
    struct relay_tunnel *t = e->tunnel;
    if (t->ended)      /* ended earlier in this batch */
        return;
    int side = e == &t->end[0] ? 0 : 1;
    if (events & EPOLLERR) {
        int error = 0;
        socklen_t len = sizeof(error);
        getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &error, &len);
        if (error) {
            tunnel_end(r, t, error);
            return;
        }
    }
    /* Urgent data: splice() stops at its mark (see flow_pass_urgent). */
    if (events & EPOLLPRI)
        t->flow[side].urgent = true;
    /* A hang-up is news for both directions through this socket. */
    unsigned which = 0;
    if (events & (EPOLLIN | EPOLLPRI | EPOLLHUP | EPOLLERR))
        which |= 1u << side;             /* the flow this socket feeds */
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        which |= 1u << (1 - side);       /* the flow that feeds it */
    tunnel_pump(r, t, which);
}

static void run_ready(struct heel_relay *r)
{
    struct relay_tunnel *t = r->ready;
    r->ready = NULL;
    while (t) {
        struct relay_tunnel *next = t->ready_next;
        t->ready = false;
        if (!t->ended)
            tunnel_pump(r, t, 3);
        t = next;
    }
}

/* ---- completions (relay thread) --------------------------------------- */

static void watch_done_pipe(struct heel_relay *r, bool watch)
{
    if (watch == r->done_watched)
        return;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = &r->done_end};
    if (epoll_ctl(r->epoll_fd, watch ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, r->done_wr, &ev) == 0)
        r->done_watched = watch;
}

/* Write the records of ended tunnels, oldest first, and free those tunnels;
 * what does not fit waits for room. */
static void report_finished(struct heel_relay *r)
{
    struct relay_tunnel *t;
    while ((t = r->finished.head)) {
        struct heel_relay_done done = {
            .id = t->id,
            .a_to_b = t->flow[0].delivered,
            .b_to_a = t->flow[1].delivered,
            .error = t->error,
        };
        ssize_t n;
        do
            n = write(r->done_wr, &done, sizeof(done));
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EAGAIN)
            break;
        /* Written (whole: smaller than PIPE_BUF), or the reader is gone
         * (EPIPE) and nobody is left to tell. */
        list_remove(&r->finished, t);
        free(t);
    }
    watch_done_pipe(r, r->finished.head != NULL);
}

/* ---- requests --------------------------------------------------------- */

static void queue_request(struct heel_relay *r, struct relay_request *req)
{
    req->next = NULL;
    pthread_mutex_lock(&r->lock);
    bool was_empty = r->requests == NULL;
    if (r->requests_tail)
        r->requests_tail->next = req;
    else
        r->requests = req;
    r->requests_tail = req;
    pthread_mutex_unlock(&r->lock);
    /* One poke per batch: the relay thread reads the eventfd before it takes
     * the queue, so a request queued after the take pokes it again. */
    if (was_empty) {
        uint64_t one = 1;
        while (write(r->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
}

static struct relay_tunnel *find_active(struct heel_relay *r, uint64_t id)
{
    /* Linear: cancels are rare next to bytes, and tunnels number hundreds. */
    for (struct relay_tunnel *t = r->active.head; t; t = t->next)
        if (t->id == id)
            return t;
    return NULL;
}

/* Carry out the queued requests; returns whether the relay is stopping. */
static bool take_requests(struct heel_relay *r)
{
    uint64_t count;
    while (read(r->wake_fd, &count, sizeof(count)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&r->lock);
    struct relay_request *req = r->requests;
    r->requests = r->requests_tail = NULL;
    bool stopping = r->stopping;
    pthread_mutex_unlock(&r->lock);

    while (req) {
        struct relay_request *next = req->next;
        if (req->tunnel) {
            tunnel_register(r, req->tunnel);
        } else {
            struct relay_tunnel *t = find_active(r, req->id);
            if (t) {
                tunnel_end(r, t, ECANCELED);
            }
            free(req);
        }
        req = next;
    }
    return stopping;
}

/* ---- the thread ------------------------------------------------------- */

static void end_all_quietly(struct heel_relay *r)
{
    while (r->active.head) {
        tunnel_end(r, r->active.head, ECANCELED);
    }
    struct relay_tunnel *t;
    while ((t = r->finished.head)) {
        list_remove(&r->finished, t);
        free(t);
    }
}

static void *relay_main(void *arg)
{
    struct heel_relay *r = arg;
    struct epoll_event events[RELAY_MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(r->epoll_fd, events, RELAY_MAX_EVENTS, r->ready ? 0 : -1);
        if (n < 0)
            n = 0;   /* EINTR (a debugger attached): nothing else can fail here */
        bool woken = false;
        for (int i = 0; i < n; i++) {
            struct relay_endpoint *e = events[i].data.ptr;
            if (e == &r->wake_end)
                woken = true;
            else if (e != &r->done_end)   /* room for records: reported below */
                endpoint_event(r, e, events[i].events);
        }
        if (woken && take_requests(r))
            break;
        run_ready(r);
        report_finished(r);
    }
    end_all_quietly(r);
    return NULL;
}

/* ---- public API ------------------------------------------------------- */

static void relay_free(struct heel_relay *r)
{
    close_if_open(&r->epoll_fd);
    close_if_open(&r->wake_fd);
    close_if_open(&r->done_rd);
    close_if_open(&r->done_wr);
    free(r);
}

static int relay_open_fds(struct heel_relay *r)
{
    r->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epoll_fd < 0)
        return errno;
    r->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->wake_fd < 0)
        return errno;
    int done[2];
    if (pipe2(done, O_CLOEXEC | O_NONBLOCK) < 0)
        return errno;
    r->done_rd = done[0];
    r->done_wr = done[1];
    fcntl(r->done_wr, F_SETPIPE_SZ, RELAY_DONE_PIPE_SIZE);   /* more is only slack */
    r->wake_end = (struct relay_endpoint){.fd = r->wake_fd};
    r->done_end = (struct relay_endpoint){.fd = r->done_wr};
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &r->wake_end};
    if (epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0)
        return errno;
    return 0;
}

int heel_relay_start(struct heel_relay **out)
{
    struct heel_relay *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->epoll_fd = r->wake_fd = r->done_rd = r->done_wr = -1;
    int err = relay_open_fds(r);
    if (!err)
        err = pthread_mutex_init(&r->lock, NULL);
    if (err) {
        relay_free(r);
        return -err;
    }
    /* The thread inherits this mask: every signal blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    err = pthread_create(&r->thread, NULL, relay_main, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        pthread_mutex_destroy(&r->lock);
        relay_free(r);
        return -err;
    }
    /* For top -H, /proc/PID/task/TID/comm and the tests; only a name. */
    pthread_setname_np(r->thread, "heel-relay");
    *out = r;
    return 0;
}

int heel_relay_notify_fd(struct heel_relay *r)
{
    return r->done_rd;
}

int heel_relay_add(struct heel_relay *r, int fd_a, int fd_b, uint64_t id)
{
    struct relay_tunnel *t;
    int err = tunnel_new(&t, fd_a, fd_b, id);
    if (err) {
        if (fd_a >= 0)
            close(fd_a);
        if (fd_b >= 0 && fd_b != fd_a)
            close(fd_b);
        return -err;
    }
    t->add_request.id = id;
    t->add_request.tunnel = t;
    queue_request(r, &t->add_request);
    return 0;
}

int heel_relay_cancel(struct heel_relay *r, uint64_t id)
{
    struct relay_request *req = calloc(1, sizeof(*req));
    if (!req)
        return -ENOMEM;
    req->id = id;
    queue_request(r, req);
    return 0;
}

void heel_relay_stop(struct heel_relay *r)
{
    pthread_mutex_lock(&r->lock);
    r->stopping = true;
    pthread_mutex_unlock(&r->lock);
    uint64_t one = 1;
    while (write(r->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
    pthread_join(r->thread, NULL);
    /* Requests queued after the thread's last take (add racing stop is the
     * caller's bug, but its fds still get closed). */
    struct relay_request *req = r->requests;
    while (req) {
        struct relay_request *next = req->next;
        if (req->tunnel) {
            close_tunnel_fds(req->tunnel);
            free(req->tunnel);
        } else {
            free(req);
        }
        req = next;
    }
    pthread_mutex_destroy(&r->lock);
    relay_free(r);
}
