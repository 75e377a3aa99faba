"""Seccomp filters for strict (deny-list) and paranoid (allow-list) plugins (launch step 9).

Why: Landlock and the uid drop limit *objects*; seccomp limits the *kernel surface*: ptrace,
mount, bpf, io_uring, keyrings, module loading and the like are refused outright (EPERM, what
the plugin sees), and without a network grant ``socket()`` only makes AF_UNIX sockets.

How: through the system ``libseccomp.so.2`` over ctypes (loaded lazily, on first use).

- ``deny``: default ALLOW, ``ERRNO(EPERM)`` for ``DENY_SYSCALLS``.
- ``allow``: default ``ERRNO(EPERM)``, ALLOW for ``ALLOW_SYSCALLS`` (broad enough for CPython,
  asyncio and pyzmq's io thread).
- Both: ``clone3`` returns ENOSYS (its flags live in memory a filter cannot read; glibc then
  falls back to ``clone``), and ``clone`` with any ``CLONE_NEW*`` flag is refused, so no
  namespace can be made around the ``unshare`` ban. Foreign architectures (i386, x32) hit the
  bad-arch action, KILL_PROCESS. ``SCMP_FLTATR_CTL_TSYNC`` puts the filter on every thread.
- ``socket``: with ``network=False`` only ``AF_UNIX`` is allowed.

``build_filter`` resolves and compiles everything (do it while files are still readable);
``Filter.load`` installs it (needs no_new_privs or CAP_SYS_ADMIN) and frees it.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from dataclasses import dataclass

from osk_daemon.isolation.probe import load_libseccomp

__all__ = ["ALLOW_SYSCALLS", "DENY_SYSCALLS", "Filter", "build_filter"]

ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
FLTATR_ACT_BADARCH = 2
FLTATR_CTL_TSYNC = 4
CMP_NE = 1
CMP_EQ = 4
CMP_MASKED_EQ = 7
# CLONE_NEWTIME NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET
CLONE_NS_FLAGS = (
    0x00000080, 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
    0x40000000,
)  # fmt: skip


def act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


DENY_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
    "chroot", "unshare", "setns", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "personality", "reboot", "swapon", "swapoff", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "open_by_handle_at", "name_to_handle_at", "acct", "quotactl",
    "lookup_dcookie", "syslog", "iopl", "ioperm", "fsopen", "fsmount", "fsconfig", "fspick",
    "move_mount", "open_tree", "mount_setattr", "process_madvise", "pidfd_getfd",
    "kcmp", "vhangup", "uselib", "nfsservctl",
)  # fmt: skip

ALLOW_SYSCALLS = (
    # files and descriptors
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "open", "openat", "close", "close_range", "stat", "fstat",
    "lstat", "newfstatat", "statx", "statfs", "fstatfs", "lseek", "access", "faccessat",
    "faccessat2", "ioctl", "fcntl", "flock", "fsync", "fdatasync", "ftruncate", "truncate",
    "getcwd", "chdir", "fchdir", "readlink", "readlinkat", "getdents64", "mkdir", "mkdirat",
    "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "symlink", "symlinkat",
    "link", "linkat", "chmod", "fchmod", "fchmodat", "umask", "utimensat", "copy_file_range",
    "sendfile", "fadvise64", "fallocate", "getxattr", "lgetxattr", "fgetxattr", "listxattr",
    "llistxattr", "flistxattr", "dup", "dup2", "dup3", "pipe", "pipe2", "memfd_create",
    "readahead", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    # memory
    "mmap", "mprotect", "munmap", "mremap", "madvise", "msync", "mincore", "brk",
    "membarrier",
    # signals and time
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigsuspend", "sigaltstack", "kill", "tgkill", "tkill", "nanosleep",
    "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time", "alarm",
    "getitimer", "setitimer", "pause", "restart_syscall", "timerfd_create",
    "timerfd_settime", "timerfd_gettime", "signalfd4",
    # waiting
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "futex",
    "futex_waitv", "sched_yield",
    # sockets (socket() itself is added with an argument filter)
    "connect", "accept", "accept4", "bind", "listen", "sendto", "recvfrom", "sendmsg",
    "recvmsg", "sendmmsg", "recvmmsg", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername", "socketpair",
    # processes and threads (clone is added with an argument filter)
    "execve", "exit", "exit_group", "wait4", "waitid", "set_robust_list",
    "get_robust_list", "set_tid_address", "rseq", "arch_prctl", "prctl", "getpid",
    "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "getgroups", "getpgrp", "getpgid", "getsid", "setpgid", "capget",
    "getrusage", "times", "uname", "getrandom", "prlimit64", "getrlimit", "sysinfo",
    "sched_getaffinity", "sched_getparam", "sched_getscheduler", "getpriority", "getcpu",
    # libzmq's io thread sets its (SCHED_OTHER) policy; RT needs CAP_SYS_NICE / RLIMIT_RTPRIO
    "sched_setscheduler", "sched_get_priority_min", "sched_get_priority_max",
    "pidfd_open", "pidfd_send_signal",
)  # fmt: skip


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass
class Filter:
    """A compiled, not yet loaded filter; ``unknown`` lists names this libseccomp lacks."""

    ctx: int
    mode: str
    unknown: list[str]

    def load(self) -> None:
        """Install the filter on every thread, then free it. Raises ``OSError``."""
        lib = _lib()
        try:
            rc = lib.seccomp_load(ctypes.c_void_p(self.ctx))
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: errno {-rc}")
        finally:
            self.release()

    def release(self) -> None:
        if self.ctx:
            _lib().seccomp_release(ctypes.c_void_p(self.ctx))
            self.ctx = 0


def _lib() -> ctypes.CDLL:
    lib = load_libseccomp()
    if lib is None:
        raise OSError(errno.ENOSYS, "libseccomp.so.2 is not installed")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
    ]  # fmt: skip
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


class _Builder:
    def __init__(self, lib: ctypes.CDLL, default: int) -> None:
        self.lib = lib
        self.ctx: int = lib.seccomp_init(default) or 0
        if not self.ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")
        self.unknown: list[str] = []

    def attr(self, attr: int, value: int) -> None:
        rc = self.lib.seccomp_attr_set(self.ctx, attr, value)
        if rc < 0:
            raise OSError(-rc, f"seccomp_attr_set({attr}): errno {-rc}")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            self.unknown.append(name)
            return
        arr = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: errno {-rc}")


def build_filter(mode: str, *, network: bool) -> Filter:
    """Compile the ``deny`` or ``allow`` filter. Raises ``OSError`` / ``ValueError``."""
    if mode not in ("deny", "allow"):
        raise ValueError(f"seccomp mode must be 'deny' or 'allow', not {mode!r}")
    eperm = act_errno(errno.EPERM)
    b = _Builder(_lib(), ACT_ALLOW if mode == "deny" else eperm)
    try:
        b.attr(FLTATR_ACT_BADARCH, ACT_KILL_PROCESS)
        b.attr(FLTATR_CTL_TSYNC, 1)
        b.rule(act_errno(errno.ENOSYS), "clone3")
        if mode == "deny":
            for name in DENY_SYSCALLS:
                b.rule(eperm, name)
            for flag in CLONE_NS_FLAGS:
                b.rule(eperm, "clone", (0, CMP_MASKED_EQ, flag, flag))
            if not network:
                b.rule(eperm, "socket", (0, CMP_NE, socket.AF_UNIX, 0))
        else:
            for name in ALLOW_SYSCALLS:
                b.rule(ACT_ALLOW, name)
            ns_mask = sum(CLONE_NS_FLAGS)
            b.rule(ACT_ALLOW, "clone", (0, CMP_MASKED_EQ, ns_mask, 0))
            families = [socket.AF_UNIX]
            if network:
                families += [socket.AF_INET, socket.AF_INET6]
            for family in families:
                b.rule(ACT_ALLOW, "socket", (0, CMP_EQ, family, 0))
    except BaseException:
        b.lib.seccomp_release(ctypes.c_void_p(b.ctx))
        raise
    return Filter(b.ctx, mode, b.unknown)
