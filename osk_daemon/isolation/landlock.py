"""Landlock: the plugin may read only its read paths and write only its write paths.

Why: after the uid drop, DAC still lets a plugin read every world-readable file and write
every world-writable one (/tmp, /dev/shm). Landlock (an unprivileged LSM) narrows that to an
allow-list; everything else gives EACCES. From ABI 4 it can deny TCP bind/connect, from
ABI 6 it can stop the plugin signalling processes outside its sandbox.

How (raw syscalls 444/445/446 through ctypes; no Python binding is needed):

- ``build_ruleset`` creates a ruleset whose *handled* rights are every filesystem right the
  kernel's ABI knows (masked to the ABI), plus TCP bind/connect (ABI >= 4) when the network is
  denied, plus the signal scope (ABI >= 6). Abstract unix sockets are *not* scoped: path
  sockets are unaffected either way, and the plugin reaches the daemon through one.
- Each existing path gets a ``PATH_BENEATH`` rule: read paths read+execute, write paths
  read+write+create+remove+truncate. A non-directory only takes file rights (the kernel
  rejects directory rights on a file). ``/dev/null``, when listed, is also writable.
  Paths that do not exist, or cannot be opened, are skipped (and returned).
- ``restrict_self`` (after ``no_new_privs``) makes the ruleset this thread's domain,
  inherited by children. It applies to the *calling thread* only on ABI < 8, so the sequence
  runs it while single-threaded.

The ruleset is built early (as root, so paths under 0700 dirs can still be opened with
``O_PATH``) and enforced late; ``Ruleset.close`` releases the fd.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from osk_daemon.isolation.probe import (
    SYS_LANDLOCK_ADD_RULE,
    SYS_LANDLOCK_CREATE_RULESET,
    SYS_LANDLOCK_RESTRICT_SELF,
    check_errno,
    landlock_abi,
    libc,
)

__all__ = ["Ruleset", "build_ruleset", "fs_rights_for_abi"]

# include/uapi/linux/landlock.h
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_SIGNAL = 1 << 1  # ABI 6
RULE_PATH_BENEATH = 1

_ABI1 = (1 << 13) - 1
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR
WRITE_RIGHTS = (
    READ_FILE | READ_DIR | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG
    | MAKE_SOCK | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE
)  # fmt: skip
ALWAYS_WRITABLE = ("/dev/null",)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def fs_rights_for_abi(abi: int) -> int:
    """Every filesystem right the given Landlock ABI knows (0 for ABI 0)."""
    if abi <= 0:
        return 0
    rights = _ABI1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def _syscall(number: int, *args: object) -> int:
    fn = libc().syscall
    fn.restype = ctypes.c_long
    return int(fn(ctypes.c_long(number), *args))


@dataclass
class Ruleset:
    """A built, not yet enforced ruleset; ``skipped`` lists paths that got no rule."""

    fd: int
    abi: int
    skipped: list[str] = field(default_factory=list)

    def restrict_self(self) -> None:
        """Enforce on this thread and its future children (needs no_new_privs). Closes fd."""
        try:
            rc = _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0))
            check_errno(rc, "landlock_restrict_self")
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _add_path(ruleset_fd: int, path: str, rights: int, handled: int) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        attr = _PathBeneath(rights & handled, fd)
        rc = _syscall(
            SYS_LANDLOCK_ADD_RULE,
            ctypes.c_int(ruleset_fd),
            ctypes.c_int(RULE_PATH_BENEATH),
            ctypes.byref(attr),
            ctypes.c_uint32(0),
        )
        check_errno(rc, f"landlock_add_rule({path})")
        return True
    finally:
        os.close(fd)


def build_ruleset(
    read_paths: Iterable[str],
    write_paths: Iterable[str],
    *,
    deny_tcp: bool,
    scope_signals: bool = True,
    abi: int | None = None,
) -> Ruleset:
    """Create the ruleset and add a rule per existing path. Raises ``OSError``.

    ``deny_tcp`` handles TCP bind/connect with no rule (so both are denied) on ABI >= 4.
    """
    abi = landlock_abi() if abi is None else abi
    if abi <= 0:
        raise OSError(95, "Landlock is not supported by this kernel")
    handled = fs_rights_for_abi(abi)
    attr = _RulesetAttr(handled, 0, 0)
    if deny_tcp and abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
    if scope_signals and abi >= 6:
        attr.scoped = SCOPE_SIGNAL
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    rc = _syscall(
        SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    ruleset = Ruleset(check_errno(rc, "landlock_create_ruleset"), abi)
    try:
        rules: dict[str, int] = {}
        for path in read_paths:
            rules[path] = rules.get(path, 0) | READ_RIGHTS
        for path in write_paths:
            rules[path] = rules.get(path, 0) | WRITE_RIGHTS
        for path in ALWAYS_WRITABLE:
            if path in rules:
                rules[path] |= READ_FILE | WRITE_FILE | TRUNCATE
        for path, rights in rules.items():
            if not _add_path(ruleset.fd, path, rights, handled):
                ruleset.skipped.append(path)
    except BaseException:
        ruleset.close()
        raise
    return ruleset
