"""Network and user namespaces for the launch sequence (launch step 2).

Why: a plugin without a network grant gets its own network namespace (only a loopback, so
``connect`` to anything gives ENETUNREACH); at paranoid it also gets a user namespace, so
even a capability it somehow held would count for nothing outside.

How: Python 3.11 has no ``os.unshare``, so ``libc.unshare`` through ctypes.

- ``enter_net_namespace``: ``unshare(CLONE_NEWNET)``; needs CAP_SYS_ADMIN, i.e. done as root
  *before* the uid drop (strict).
- ``enter_user_namespace``: done *after* the drop to the plugin uid, so the namespace is owned
  by that unprivileged uid (root-owned would let the plugin's "root inside" act as the
  outer root on files). The process must be single-threaded (EINVAL otherwise). The map is
  the identity for the plugin's own uid/gid (``"<uid> <uid> 1"``), not ``"0 <uid> 1"``: the
  plugin sees its real ids and, being non-zero inside, an ``execve`` never grants it
  capabilities. ``/proc/self/setgroups`` must say "deny" before ``gid_map`` can be written.
  After the uid drop the process is not dumpable, which makes ``/proc/self/*`` root-owned and
  the map files unwritable by us, so dumpable is set for the three writes and cleared again.
  Entering the namespace grants a full capability set *inside* it; the caller clears it
  (``privileges.drop_bounding_set`` + ``clear_capabilities``). With ``net=True`` the network
  namespace is created in the same call, owned by the new user namespace.

The loopback stays down (nothing in a plugin needs it: the daemon is reached over a path
socket, which is not network-namespaced).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from osk_daemon.isolation.privileges import set_dumpable
from osk_daemon.isolation.probe import check_errno, libc

__all__ = ["CLONE_NEWNET", "CLONE_NEWUSER", "enter_net_namespace", "enter_user_namespace"]

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _unshare(flags: int) -> None:
    check_errno(libc().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def enter_net_namespace() -> None:
    """Move this process into a fresh network namespace. Raises ``OSError``."""
    _unshare(CLONE_NEWNET)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def enter_user_namespace(*, net: bool) -> None:
    """Enter a new user namespace mapping only the current uid/gid (and a netns if ``net``).

    Raises ``OSError`` (EINVAL when threads exist, EPERM/ENOSPC when disabled or at the
    ``max_user_namespaces`` limit).
    """
    uid, gid = os.geteuid(), os.getegid()
    _unshare(CLONE_NEWUSER | (CLONE_NEWNET if net else 0))
    set_dumpable(True)
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    finally:
        set_dumpable(False)


def in_user_namespace() -> bool:
    """True if this process's uid_map is not the initial namespace's full range."""
    try:
        text = Path("/proc/self/uid_map").read_text()
    except OSError:
        return False
    return text.split() != ["0", "0", "4294967295"]
