"""What this kernel can enforce, asked without restricting the caller.

Why: the daemon must decide at config load whether a plugin's sandbox level can be enforced
(and refuse to start it when it cannot and ``require`` is set), and the launch sequence must
know which steps it can attempt. Both ask ``probe_kernel``.

How: every check is a read-only question. Landlock is asked for its ABI version with the
``LANDLOCK_CREATE_RULESET_VERSION`` flag (no ruleset is created); seccomp through
``/proc/sys/kernel/seccomp/actions_avail`` plus a ``dlopen`` of the system libseccomp;
namespaces through ``/proc/self/ns/*`` and the ``max_*_namespaces`` sysctls; no_new_privs
with ``PR_GET_NO_NEW_PRIVS``. Cost: a handful of small ``/proc`` reads and one ``dlopen``
(cached), well under a millisecond after the first call.

This module also holds the one shared libc handle (``libc()``) for the other isolation
modules: ``ctypes.CDLL(None)`` resolves symbols in the already-loaded C library, so it never
touches the filesystem and works after a privilege drop or under Landlock.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LIBSECCOMP_PATHS", "KernelFeatures", "check_errno", "libc", "probe_kernel"]

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
PR_GET_NO_NEW_PRIVS = 39

# The system library first (Debian/Ubuntu multiarch, then the classic paths).
LIBSECCOMP_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libseccomp.so.2",
    "/lib/x86_64-linux-gnu/libseccomp.so.2",
    "/usr/lib64/libseccomp.so.2",
    "/usr/lib/libseccomp.so.2",
    "libseccomp.so.2",
)


@dataclass(frozen=True)
class KernelFeatures:
    """The sandbox primitives this kernel (and host) offers; ``landlock_abi`` 0 = none."""

    landlock_abi: int = 0
    seccomp: bool = False
    libseccomp: bool = False
    user_namespaces: bool = False
    net_namespaces: bool = False
    no_new_privs: bool = False


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library, with errno capture (no file is opened)."""
    return ctypes.CDLL(None, use_errno=True)


def check_errno(rc: int, what: str) -> int:
    """Raise ``OSError`` with the C errno when a libc call returned -1; else return ``rc``."""
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


@functools.cache
def load_libseccomp() -> ctypes.CDLL | None:
    """``dlopen`` the system libseccomp once; None if it is not installed."""
    for path in LIBSECCOMP_PATHS:
        try:
            return ctypes.CDLL(path, use_errno=True)
        except OSError:
            continue
    return None


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 if Landlock is absent or disabled."""
    syscall = libc().syscall
    syscall.restype = ctypes.c_long
    rc = syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        ctypes.c_void_p(None),
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return int(rc) if rc > 0 else 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _namespace(kind: str) -> bool:
    if not Path(f"/proc/self/ns/{kind}").exists():
        return False
    limit = _read(f"/proc/sys/user/max_{kind}_namespaces")
    return not limit.isdigit() or int(limit) > 0


def probe_kernel() -> KernelFeatures:
    """Ask the kernel what it can enforce. Safe in the daemon: it restricts nothing."""
    actions = _read("/proc/sys/kernel/seccomp/actions_avail").split()
    nnp = libc().prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) >= 0
    return KernelFeatures(
        landlock_abi=landlock_abi(),
        seccomp="errno" in actions and "allow" in actions,
        libseccomp=load_libseccomp() is not None,
        user_namespaces=_namespace("user"),
        net_namespaces=_namespace("net"),
        no_new_privs=nnp,
    )
