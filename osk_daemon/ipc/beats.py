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

The same page carries the worker's own health checks (``worker.health``), so that a
healthy plugin costs the daemon no frame either: 500 probes a second as frames kept an
idle daemon 7-8 % busy (measured at 500 plugins). The layout, little-endian:

====== ====== ===============================================================
offset type   what
====== ====== ===============================================================
0      f64    the last beat (``time.monotonic()``)
8      u32    healthy checks so far that went unreported (no frame: nothing changed)
12     u32    flags: ``PUSHES_HEALTH`` once the worker runs its own checks
16     f64    the summed duration of those checks, in seconds
====== ====== ===============================================================

A page cut short (an older worker's 8 bytes, or a truncated file) reads as beats alone.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "BEAT_SIZE",
    "PUSHES_HEALTH",
    "Beat",
    "BeatPage",
    "beat_path",
    "mark_pushes_health",
    "write_beat",
    "write_healthy",
]

BEAT_SIZE = 24
PUSHES_HEALTH = 1
_PAGE = struct.Struct("<dIId")  # the whole page, as the table above lays it out
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_HEALTHY_AT, _FLAGS_AT, _DURATIONS_AT = 8, 12, 16


def beat_path(fifo: Path) -> Path:
    """The beat file of the life whose stdout FIFO is ``fifo`` (same stem)."""
    return fifo.with_suffix(".beat")


def write_beat(page: mmap.mmap, now: float) -> None:
    """The worker's side: record that its event loop ran at ``now`` (monotonic)."""
    _F64.pack_into(page, 0, now)


def mark_pushes_health(page: mmap.mmap, pushes: bool = True) -> None:
    """The worker's side: from now on it checks its own health (marked before its READY),
    or no longer (the daemon probes it again)."""
    _U32.pack_into(page, _FLAGS_AT, PUSHES_HEALTH if pushes else 0)


def write_healthy(page: mmap.mmap, count: int, durations: float) -> None:
    """The worker's side: ``count`` unreported healthy checks so far, ``durations`` long
    in all. The count goes last: a read between the two stores sees the older count with
    the newer sum, which only shifts one check's duration to the next read."""
    _F64.pack_into(page, _DURATIONS_AT, durations)
    _U32.pack_into(page, _HEALTHY_AT, count & 0xFFFFFFFF)


class BeatPage(NamedTuple):
    """One read of a page: the last beat; whether its worker pushes its health, and the
    count and summed duration of its unreported healthy checks."""

    beat: float
    pushes_health: bool
    healthy: int
    durations: float


_NO_PAGE = BeatPage(0.0, False, 0, 0.0)


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

    def read(self) -> BeatPage:
        """The page as it is now, in one ``pread``. The beat is 0.0 before the first one;
        a page cut short reads as no beat (then only frames count), an older worker's
        8-byte page as a beat without health."""
        try:
            raw = os.pread(self._fd, BEAT_SIZE, 0)
        except OSError:
            return _NO_PAGE
        if len(raw) < BEAT_SIZE:
            if len(raw) < _F64.size:
                return _NO_PAGE
            return BeatPage(_F64.unpack_from(raw)[0], False, 0, 0.0)
        beat, healthy, flags, durations = _PAGE.unpack(raw)
        return BeatPage(beat, bool(flags & PUSHES_HEALTH), healthy, durations)

    def last(self) -> float:
        """The monotonic time of the worker's last beat (see ``read``)."""
        return self.read().beat

    def close(self, remove: Callable[[Path], object] | None = None) -> None:
        """Close and remove the file: the life it belonged to is over. ``remove``, if
        given, removes it instead of an unlink here (the daemon's ``unlinker``: an unlink
        on a disk-backed runtime dir can take milliseconds)."""
        os.close(self._fd)
        (remove or _remove)(self.path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
