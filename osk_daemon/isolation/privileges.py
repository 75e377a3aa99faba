"""Privilege steps of the launch sequence: capabilities, uid/gid, PDEATHSIG, no_new_privs.

Why: a plugin at standard+ must run as its own unprivileged uid with no way back: no
supplementary groups inherited from the daemon, an empty capability bounding set (so no exec
can regain a capability), ``no_new_privs`` (no setuid/file-cap exec; required for unprivileged
Landlock and seccomp), and a parent-death signal so it dies with the daemon.

How (ctypes ``prctl``/``capset``, Python 3.11 has no wrappers):

- ``drop_bounding_set``: ``PR_CAPBSET_DROP`` for 0..``cap_last_cap`` (needs CAP_SETPCAP, so
  before the uid change).
- ``drop_to``: ``setgroups([])``, ``setresgid``, ``setresuid``, then verified with
  ``getres*id`` and ``getgroups``. The kernel clears permitted/effective caps on the 0 -> non-0
  transition and resets "dumpable" to 0 (``/proc/self`` becomes root-owned; see
  ``namespaces`` for why that matters).
- ``clear_capabilities``: ``capset`` with empty sets, for a process that holds capabilities
  without a uid transition (just after entering a user namespace).
- ``set_pdeathsig``: must come *after* the uid change, which clears it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from osk_daemon.isolation.probe import check_errno, libc

__all__ = [
    "clear_capabilities",
    "drop_bounding_set",
    "drop_to",
    "get_pdeathsig",
    "last_cap",
    "no_new_privs",
    "set_dumpable",
    "set_no_new_privs",
    "set_pdeathsig",
]

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
SYS_CAPSET = 126
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _prctl_raw(option: int, arg: int = 0) -> int:
    zero = ctypes.c_ulong(0)
    rc: int = libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)
    return rc


def _prctl(option: int, arg: int = 0) -> int:
    return check_errno(_prctl_raw(option, arg), f"prctl({option})")


def last_cap() -> int:
    """The highest capability number this kernel knows (``cap_last_cap``)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text().strip())
    except (OSError, ValueError):
        return 63


def drop_bounding_set() -> None:
    """Empty the capability bounding set. Raises ``OSError`` (EPERM without CAP_SETPCAP)."""
    for cap in range(last_cap() + 1):
        if _prctl_raw(PR_CAPBSET_READ, cap) == 1:
            _prctl(PR_CAPBSET_DROP, cap)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets of this thread."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    syscall = libc().syscall
    rc = syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), ctypes.byref(data))
    check_errno(rc, "capset")


def drop_to(uid: int | None, gid: int | None) -> None:
    """Drop supplementary groups, then gid, then uid, and verify. Raises ``OSError``.

    With both None only the supplementary groups go (the process keeps its ids).
    """
    os.setgroups([])
    if gid is not None:
        os.setresgid(gid, gid, gid)
        if os.getresgid() != (gid, gid, gid):
            raise OSError(f"setresgid({gid}) did not stick: {os.getresgid()}")
    if uid is not None:
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid):
            raise OSError(f"setresuid({uid}) did not stick: {os.getresuid()}")
    extra = set(os.getgroups()) - {os.getegid()}
    if extra:
        raise OSError(f"supplementary groups left after setgroups([]): {sorted(extra)}")


def set_pdeathsig(signum: int) -> None:
    """Ask the kernel for ``signum`` when the parent thread exits."""
    _prctl(PR_SET_PDEATHSIG, signum)


def get_pdeathsig() -> int:
    """The current parent-death signal (0 = none)."""
    value = ctypes.c_int(0)
    rc = libc().prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    check_errno(rc, "prctl(PR_GET_PDEATHSIG)")
    return value.value


def set_no_new_privs() -> None:
    """Set ``no_new_privs`` for this thread and everything it execs (irreversible)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    """True if ``no_new_privs`` is set."""
    return _prctl(PR_GET_NO_NEW_PRIVS) == 1


def set_dumpable(on: bool) -> None:
    """``PR_SET_DUMPABLE``: 0 keeps /proc/self root-owned and same-uid ptrace out."""
    _prctl(PR_SET_DUMPABLE, 1 if on else 0)
