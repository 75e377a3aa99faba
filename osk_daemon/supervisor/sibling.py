"""Fork a child whose parent is our parent: ``clone(CLONE_PARENT)`` for the zygote.

Why: a plugin process must be the daemon's child (only a parent reads the exact exit
status, and the daemon restarts on it), but the zygote forks it. The zygote used to
double-fork: its child A forked the plugin B and exited, so B was re-parented to the
daemon, a child subreaper. A cost each spawn a second fork (the zygote's page tables
copied again), A's own copy-on-write faults and A's exit: 6-7 ms of CPU per cold spawn on
a 2-core VM, a sixth of a 500-plugin boot, and a fork-and-exit next to plugins that serve
during a swap. With ``CLONE_PARENT`` the kernel makes B the daemon's child from its first
instruction, and A is not needed.

How: ``os.fork`` is ``PyOS_BeforeFork``, ``fork()``, then ``PyOS_AfterFork_Child`` or
``PyOS_AfterFork_Parent``. ``fork_sibling`` makes the same calls through ``ctypes``
(``PyDLL``: the GIL stays held, as in ``os.fork``), with the raw ``clone`` system call in
place of glibc's ``fork()``. What glibc's ``fork()`` does besides the system call matters
little in a single-threaded process (the zygote's rule: no lock can be held by another
thread), except two per-thread records, which are set here as glibc sets them:

- glibc caches the thread's id in its thread descriptor (``struct pthread``'s ``tid``),
  and uses it for recursive mutexes and for signalling the thread. ``CLONE_CHILD_SETTID``
  makes the kernel write the child's id there, as glibc's own ``fork`` does. The field's
  offset is not public API; glibc exports it for debuggers (``libthread_db``) as
  ``_thread_db_pthread_tid``. It is read once and checked: the value at that offset must
  be the calling thread's id.
- A new process has no robust-futex list; the child registers the parent's again
  (``get_robust_list`` before, ``set_robust_list`` after).

Anything unexpected (another C library, another architecture, a check that fails) makes
``sibling_fork_unavailable`` return the reason, and the zygote double-forks as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any, NamedTuple

__all__ = ["fork_sibling", "sibling_fork_unavailable"]

_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000


class _Arch(NamedTuple):
    clone: int
    get_robust_list: int
    set_robust_list: int
    child_tid_arg: int  # which of clone's five arguments is the child's tid address


# x86_64: clone(flags, stack, parent_tid, child_tid, tls); arm64: (flags, stack,
# parent_tid, tls, child_tid)
_ARCHES = {
    "x86_64": _Arch(56, 274, 273, 3),
    "aarch64": _Arch(220, 100, 99, 4),
}


class _Sibling(NamedTuple):
    arch: _Arch
    syscall: Any  # libc's syscall(2) wrapper
    pthread_self: Any
    tid_offset: int


def _load() -> _Sibling | str:
    """What ``fork_sibling`` needs, or why it cannot work here."""
    arch = _ARCHES.get(os.uname().machine)
    if arch is None:
        return f"no clone system call number known for {os.uname().machine}"
    try:
        libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: calls keep the GIL
        field = (ctypes.c_uint32 * 3).in_dll(libc, "_thread_db_pthread_tid")
        syscall = libc.syscall
        pthread_self = libc.pthread_self
    except (OSError, ValueError, AttributeError) as exc:
        return f"not glibc with libthread_db's descriptors: {exc}"
    bits, count, offset = field
    if bits != 32 or count != 1:
        return f"glibc describes the thread id as {count} x {bits} bits"
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long] * 6
    pthread_self.restype = ctypes.c_void_p
    pthread_self.argtypes = []
    for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
        getattr(ctypes.pythonapi, name).restype = None
    loaded = _Sibling(arch, syscall, pthread_self, offset)
    try:
        _tid_address(loaded)
    except OSError as exc:
        return str(exc)
    return loaded


def _tid_address(s: _Sibling) -> int:
    """The address of the calling thread's cached id, checked against ``gettid``."""
    address = int(s.pthread_self()) + s.tid_offset
    if ctypes.c_int.from_address(address).value != threading.get_native_id():
        raise OSError(0, "glibc's thread descriptor does not hold the thread id where described")
    return address


def _robust_list(s: _Sibling) -> tuple[int, int]:
    """The calling thread's registered robust-futex list: (head, length)."""
    head = ctypes.c_void_p()
    length = ctypes.c_size_t()
    if s.syscall(s.arch.get_robust_list, 0, ctypes.addressof(head), ctypes.addressof(length), 0, 0):
        return 0, 0
    return head.value or 0, length.value


_LOADED: _Sibling | str | None = None


def _loaded() -> _Sibling | str:
    global _LOADED
    if _LOADED is None:
        _LOADED = _load()
    return _LOADED


def sibling_fork_unavailable() -> str | None:
    """Why ``fork_sibling`` cannot be used in this process, or None if it can."""
    loaded = _loaded()
    return loaded if isinstance(loaded, str) else None


def fork_sibling() -> int:
    """``os.fork``, except that the child's parent is this process's parent.

    Returns the child's pid in the parent and 0 in the child. Call it only from a
    single-threaded process (as with any fork of a Python process). Raises ``OSError`` if
    the kernel refuses (``EINVAL`` in a pid namespace's init, ``EAGAIN`` at the pid limit)
    and ``RuntimeError`` where ``sibling_fork_unavailable`` gives a reason.
    """
    s = _loaded()
    if isinstance(s, str):
        raise RuntimeError(f"fork_sibling is not available: {s}")
    args = [_CLONE_PARENT | _CLONE_CHILD_SETTID | signal.SIGCHLD, 0, 0, 0, 0]
    args[s.arch.child_tid_arg] = _tid_address(s)
    head, length = _robust_list(s)
    sys.audit("os.fork")
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = s.syscall(s.arch.clone, *args, 0)
    if pid == 0:
        if head:
            s.syscall(s.arch.set_robust_list, head, length, 0, 0, 0, 0)
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone(CLONE_PARENT): {os.strerror(err)}")
    return int(pid)
