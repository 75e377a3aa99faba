"""Heartbeats through shared memory: one small file per life, mapped by worker and daemon.

Why: a heartbeat proves the worker's event loop still runs. Sent as a ZeroMQ frame every
0.5 s, 500 plugins cost the daemon 1000 receives a second (~13 % of a core, measured) and
every worker a send and an I/O-thread wake-up per beat. Written into memory both map, a
beat costs the worker one store and the daemon nothing until it looks.

How: for each life the daemon creates ``<stem>.beat`` next to its output FIFOs (the
runtime dir: tmpfs under systemd), ``BEAT_SIZE`` bytes of zeros, and hands the worker an
fd of it with the spawn request (``SpawnRequest.beat``; ``spec["beat_fd"]``
names it in the worker). The worker maps it and, from its event loop every
``heartbeat_interval``, stores ``time.monotonic()`` there (CLOCK_MONOTONIC: one clock for
every process of the machine) as a little-endian double; ``Beat.last`` reads it back.
An aligned 8-byte store is atomic on the machines we run on, and a torn read would only
look like an old beat. A re-adopting daemon opens the same file by its path (the state
file keeps the FIFOs' paths; the beat file's name follows theirs). The file is removed
when the life ends. A worker without one (adopted from a daemon that gave it none, or the
file could not be made) sends HEARTBEAT frames as before.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = ["BEAT_SIZE", "Beat", "beat_path", "write_beat"]

BEAT_SIZE = 8
_STAMP = struct.Struct("<d")


def beat_path(fifo: Path) -> Path:
    """The beat file of the life whose stdout FIFO is ``fifo`` (same stem)."""
    return fifo.with_suffix(".beat")


def write_beat(page: mmap.mmap, now: float) -> None:
    """The worker's side: record that its event loop ran at ``now`` (monotonic)."""
    _STAMP.pack_into(page, 0, now)


class Beat:
    """The daemon's handle on one life's beat file.

    The daemon reads it with ``pread`` on an fd it keeps, not through a mapping: a file
    truncated under a mapping raises SIGBUS in whoever reads it, and the daemon must not
    die of a stray ``truncate``. (The worker maps it; the page is allocated up front, so a
    full tmpfs fails ``create``, not the worker's first store.)"""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, path: Path) -> tuple[Beat, int]:
        """A new zeroed beat file at ``path``; also another fd of it for the child (the
        caller closes that once the child has its copy). Raises ``OSError``."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, BEAT_SIZE)
            child = os.dup(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return cls(path, fd), child

    @classmethod
    def attach(cls, path: Path) -> Beat | None:
        """Open the beat file a previous daemon made for a life we adopt; None if it is not
        there (then that worker's HEARTBEAT frames are all there is)."""
        try:
            return cls(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None

    def last(self) -> float:
        """The monotonic time of the worker's last beat; 0.0 before the first one (or if
        the file was cut short: then only frames count)."""
        try:
            raw = os.pread(self._fd, BEAT_SIZE, 0)
        except OSError:
            return 0.0
        if len(raw) < BEAT_SIZE:
            return 0.0
        value: float = _STAMP.unpack(raw)[0]
        return value

    def close(self, remove: Callable[[Path], object] | None = None) -> None:
        """Close and remove the file: the life it belonged to is over. ``remove``, if
        given, removes it instead of an unlink here (the daemon's ``unlinker``: an unlink
        on a disk-backed runtime dir can take milliseconds)."""
        os.close(self._fd)
        (remove or _remove)(self.path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
