"""The stacks of the trampoline's CLONE_VM children have a guard page
(csrc/stack.h): a child that overran its stack faults instead of writing
into the host's memory below it.

A small C program includes csrc/stack.h, the header spawn.c takes its
stacks from, and touches the memory around a stack for real in a forked
child; the test reads the child's fate from outside.  That the three
clone sites of spawn.c use heel_stack_alloc is plain to read there; what
this checks is that the helper leaves an inaccessible page under every
stack it hands out, of the sizes spawn.c asks for.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from helpers import compile_c

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

PROGRAM = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include "stack.h"

static volatile char sink;

/* Recurses until the stack runs out: each frame holds a 1 KiB array. */
static int deep(int n)
{
    volatile char frame[1024];
    memset((char *)frame, n, sizeof(frame));
    sink = frame[n % 1024];
    return n > 1000000 ? 0 : deep(n + 1) + frame[0];
}

static int child_deep(void *arg)
{
    (void)arg;
    return deep(0);
}

int main(int argc, char **argv)
{
    size_t size = strtoul(argv[2], NULL, 0);
    struct heel_stack s;
    char *top = heel_stack_alloc(&s, size);
    if (!top) {
        perror("heel_stack_alloc");
        return 3;
    }
    size_t usable = (size_t)(top - s.map) - heel_page_size();
    if (usable < size) {
        fprintf(stderr, "only %zu usable bytes of %zu\n", usable, size);
        return 4;
    }
    char *bottom = top - usable;
    if (!strcmp(argv[1], "whole")) {          /* every usable byte is writable */
        memset(bottom, 0x5a, usable);
        return 0;
    }
    if (!strcmp(argv[1], "below")) {          /* the byte right under the stack */
        *(volatile char *)(bottom - 1) = 1;
        return 0;
    }
    if (!strcmp(argv[1], "guard-read")) {     /* the guard is not readable either */
        sink = *(volatile char *)(bottom - heel_page_size());
        return 0;
    }
    if (!strcmp(argv[1], "overrun")) {        /* a CLONE_VM child runs off its stack */
        int pid = clone(child_deep, top, CLONE_VM | SIGCHLD, NULL);
        int status;
        if (pid < 0) {
            perror("clone");
            return 3;
        }
        if (waitpid(pid, &status, 0) < 0) {
            perror("waitpid");
            return 3;
        }
        if (WIFSIGNALED(status)) {
            printf("child signal %d\n", WTERMSIG(status));
            return 0;
        }
        printf("child exit %d\n", WEXITSTATUS(status));
        return 0;
    }
    if (!strcmp(argv[1], "free")) {           /* freed: the whole mapping is gone */
        char *map = s.map;
        heel_stack_free(&s);
        *(volatile char *)(map + heel_page_size()) = 1;
        return 0;
    }
    return 2;
}
"""

# The sizes spawn.c asks for (heel_spawn, limit_quotas_of, heel_userns_create),
# and one that is not a multiple of the page.
SIZES = [256 * 1024, 64 * 1024, 16 * 1024, 5000]


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> str:
    return compile_c(PROGRAM, tmp_path_factory.mktemp("stack"), "stack_guard",
                     "-O1", "-Wall", "-Werror", "-I", CSRC)


def _run(program: str, mode: str, size: int) -> subprocess.CompletedProcess:
    return subprocess.run([program, mode, str(size)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("size", SIZES)
def test_every_byte_of_the_stack_is_usable(program, size):
    result = _run(program, "whole", size)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["below", "guard-read"])
def test_the_page_under_the_stack_faults(program, size, mode):
    result = _run(program, mode, size)
    assert result.returncode == -signal.SIGSEGV, (result.returncode, result.stdout, result.stderr)


def test_a_child_that_runs_off_its_stack_dies_there(program):
    """A CLONE_VM child (as spawn.c's are) that recurses without end: it
    dies of SIGSEGV at the guard, and its parent, whose memory it shares,
    carries on and reports it."""
    result = _run(program, "overrun", 16 * 1024)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child signal %d" % signal.SIGSEGV


def test_the_stack_is_unmapped_when_freed(program):
    result = _run(program, "free", 16 * 1024)
    assert result.returncode == -signal.SIGSEGV, (result.returncode, result.stderr)
