/*
 * stack.h - stacks for the children that share the host's memory.
 *
 * spawn.c starts its children with CLONE_VM: they run on a stack that the
 * parent maps for them, in the middle of the host's address space.  A child
 * that ran past the end of that stack would write, silently, into whatever
 * mapping the kernel happened to place below it: the host's heap, say.  So
 * each stack has an inaccessible page under it, and an overrun faults there
 * instead (the child dies of SIGSEGV; the parent sees a failed spawn).
 * The children's frames are small and do not recurse (the largest is some
 * 5.5 KB), so this is a second line, not the first.
 *
 * Called by the parent only, never between clone and exec.
 */
#ifndef HEEL_STACK_H
#define HEEL_STACK_H

#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>
#include <unistd.h>

struct heel_stack {
    char *map;  /* the whole mapping: the guard page, then the stack */
    size_t len;
};

static size_t heel_page_size(void)
{
    long page = sysconf(_SC_PAGESIZE);
    return page > 0 ? (size_t)page : 4096;
}

/* Maps at least `size` usable bytes above one PROT_NONE page.  Returns the
 * top of the stack (what clone() takes: stacks grow down here) or NULL with
 * errno set, and nothing mapped. */
static char *heel_stack_alloc(struct heel_stack *s, size_t size)
{
    size_t page = heel_page_size();
    int err;

    size = (size + page - 1) / page * page;
    s->len = size + page;
    s->map = mmap(NULL, s->len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (s->map == MAP_FAILED) {
        s->map = NULL;
        return NULL;
    }
    if (mprotect(s->map, page, PROT_NONE) < 0) {
        err = errno;
        munmap(s->map, s->len);
        s->map = NULL;
        errno = err;
        return NULL;
    }
    return s->map + s->len;
}

static void heel_stack_free(struct heel_stack *s)
{
    if (s->map)
        munmap(s->map, s->len);
    s->map = NULL;
}

#endif
