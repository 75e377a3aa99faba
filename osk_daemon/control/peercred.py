"""Who is on the other end of a control connection, and may they talk to us.

Why: the control socket can stop plugins and shut the daemon down, so its file mode (0600)
is the first gate and the kernel-reported peer credentials are the second. The second gate
matters when an operator loosens the mode or the directory (``daemon.control_group``):
the file mode then admits the group, and this check still refuses everyone else.

How: Linux reports the connecting process's pid, uid and gid at ``connect()`` time via
``SO_PEERCRED`` (``struct ucred``, three ints). Supplementary groups are not part of it, so
they are read from ``/proc/<pid>/status`` (best effort: a peer that already exited counts
with its primary gid only). Root and the daemon's own uid are always allowed.
"""

from __future__ import annotations

import grp
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osk_daemon.errors import ConfigError

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The credentials the kernel recorded for a connected peer."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """Read ``SO_PEERCRED`` from a connected AF_UNIX socket. Raises ``OSError`` on failure."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def supplementary_groups(pid: int, proc: Path = Path("/proc")) -> frozenset[int]:
    """The peer's supplementary gids from ``/proc/<pid>/status``; empty if unreadable."""
    try:
        text = (proc / str(pid) / "status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    return frozenset()


def resolve_group(name: str) -> int:
    """The gid of group ``name`` (a numeric string is taken as a gid).

    Raises ``ConfigError`` if no such group exists.
    """
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            "daemon", "control_group", f"no group named {name!r}; create it or unset the key"
        ) from None


def is_allowed(
    peer: PeerCred,
    *,
    own_uid: int,
    allowed_gid: int | None,
    groups_of: Callable[[int], frozenset[int]] = supplementary_groups,
) -> bool:
    """Whether ``peer`` may use the control socket.

    Allowed: uid 0, ``own_uid``, or (when ``allowed_gid`` is set) a peer whose primary or
    supplementary groups include it. ``groups_of`` is only called in the last case.
    """
    if peer.uid in (0, own_uid):
        return True
    if allowed_gid is None:
        return False
    return peer.gid == allowed_gid or allowed_gid in groups_of(peer.pid)
