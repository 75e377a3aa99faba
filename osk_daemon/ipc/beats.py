"""Heartbeats through shared memory: one small file per life, mapped by worker and daemon.

Why: a heartbeat proves the worker's event loop still runs. Sent as a ZeroMQ frame every
0.5 s, 500 plugins cost the daemon 1000 receives a second (~13 % of a core, measured) and
every worker a send and an I/O-thread wake-up per beat. Written into memory both map, a
beat costs the worker one store and the daemon nothing until it looks.

How: for each life the daemon creates ``<stem>.beat`` next to its output FIFOs (the
runtime dir: tmpfs under systemd), ``BEAT_SIZE`` bytes of zeros, maps it and hands the
worker an fd of it with the spawn request (``SpawnRequest.beat``; ``spec["beat_fd"]``
names it in the worker). The worker maps it and, from its event loop every
``heartbeat_interval``, stores ``time.monotonic()`` there (CLOCK_MONOTONIC: one clock for
every process of the machine) as a little-endian double; ``Beat.last`` reads it back.
An aligned 8-byte store is atomic on the machines we run on, and a torn read would only
look like an old beat. A re-adopting daemon maps the same file by its path (the state
file keeps the FIFOs' paths; the beat file's name follows theirs). The file is removed
when the life ends. A worker without one (adopted from a daemon that gave it none, or the
file could not be made) sends HEARTBEAT frames as before.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
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
    """The daemon's map of one life's beat file."""

    def __init__(self, path: Path, page: mmap.mmap) -> None:
        self.path = path
        self._page = page

    @classmethod
    def create(cls, path: Path) -> tuple[Beat, int]:
        """A new zeroed beat file at ``path``, mapped; also an fd of it for the child (the
        caller closes that once the child has its copy). Raises ``OSError``."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, BEAT_SIZE)
            page = mmap.mmap(fd, BEAT_SIZE)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return cls(path, page), fd

    @classmethod
    def attach(cls, path: Path) -> Beat | None:
        """Map the beat file a previous daemon made for a life we adopt; None if it is not
        there (then that worker's HEARTBEAT frames are all there is)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < BEAT_SIZE:
                return None
            return cls(path, mmap.mmap(fd, BEAT_SIZE))
        except OSError:
            return None
        finally:
            os.close(fd)

    def last(self) -> float:
        """The monotonic time of the worker's last beat; 0.0 before the first one."""
        value: float = _STAMP.unpack_from(self._page, 0)[0]
        return value

    def close(self) -> None:
        """Unmap and remove the file: the life it belonged to is over."""
        self._page.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
