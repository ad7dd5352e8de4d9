/*
 * syscalls.h - numbers of the system calls heel uses or filters that older
 * kernel headers may lack.  They are the "unified" numbers (424 and up),
 * the same on every architecture, so a build on an old image still works.
 */
#ifndef HEEL_SYSCALLS_H
#define HEEL_SYSCALLS_H

#include <sys/syscall.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif
#ifndef __NR_open_tree
#define __NR_open_tree 428
#endif
#ifndef __NR_move_mount
#define __NR_move_mount 429
#endif
#ifndef __NR_fsopen
#define __NR_fsopen 430
#endif
#ifndef __NR_fsconfig
#define __NR_fsconfig 431
#endif
#ifndef __NR_fsmount
#define __NR_fsmount 432
#endif
#ifndef __NR_fspick
#define __NR_fspick 433
#endif
#ifndef __NR_clone3
#define __NR_clone3 435
#endif
#ifndef __NR_close_range
#define __NR_close_range 436
#endif
#ifndef __NR_openat2
#define __NR_openat2 437
#endif
#ifndef __NR_pidfd_send_signal
#define __NR_pidfd_send_signal 424
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif
#ifndef __NR_mount_setattr
#define __NR_mount_setattr 442
#endif
#ifndef __NR_quotactl_fd
#define __NR_quotactl_fd 443
#endif
#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#endif
#ifndef __NR_landlock_add_rule
#define __NR_landlock_add_rule 445
#endif
#ifndef __NR_landlock_restrict_self
#define __NR_landlock_restrict_self 446
#endif
#ifndef __NR_fchmodat2
#define __NR_fchmodat2 452
#endif
#ifndef __NR_statmount
#define __NR_statmount 457
#endif
#ifndef __NR_listmount
#define __NR_listmount 458
#endif
#ifndef __NR_lsm_set_self_attr
#define __NR_lsm_set_self_attr 460
#endif
#ifndef __NR_open_tree_attr
#define __NR_open_tree_attr 467
#endif

/* The highest syscall number of the kernels heel knows (file_setattr,
 * Linux 6.17; 6.18 added none).  The numbers past it answer ENOSYS inside
 * the sandbox whatever a newer kernel gives them (see seccomp.c). */
#define HEEL_LAST_KNOWN_SYSCALL 469u

/* openat2(): struct open_how and the RESOLVE_ flags, for older headers. */
#include <stdint.h>
#define HEEL_RESOLVE_NO_MAGICLINKS 0x02
#define HEEL_RESOLVE_NO_SYMLINKS 0x04

struct heel_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

#endif
