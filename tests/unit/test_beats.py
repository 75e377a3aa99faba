"""The shared-memory heartbeat page (ipc.beats): what the worker stores, the daemon reads."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from osk_daemon.ipc.beats import (
    BEAT_SIZE,
    Beat,
    BeatPage,
    beat_path,
    mark_pushes_health,
    write_beat,
    write_healthy,
)

pytestmark = pytest.mark.timeout(10)


def test_a_beat_written_through_the_childs_fd_is_read_by_the_daemon(tmp_path: Path) -> None:
    path = beat_path(tmp_path / "p-0-abc.out")
    assert path.name == "p-0-abc.beat"  # next to the life's FIFOs, named after them
    beat, fd = Beat.create(path)
    try:
        assert beat.last() == 0.0  # no beat yet: the spawn time stands
        worker = mmap.mmap(fd, BEAT_SIZE)  # what the worker maps from the fd it was given
        write_beat(worker, 1234.5)
        assert beat.last() == 1234.5
        adopted = Beat.attach(path)  # a restarted daemon opens the same page by its path
        assert adopted is not None and adopted.last() == 1234.5
        write_beat(worker, 1240.25)
        assert adopted.last() == 1240.25
        worker.close()
    finally:
        os.close(fd)
    beat.close()
    assert not path.exists()  # the life is over: its page goes


def test_a_missing_or_cut_short_page_reads_as_no_beat(tmp_path: Path) -> None:
    assert Beat.attach(tmp_path / "missing.beat") is None
    short = tmp_path / "short.beat"
    short.write_bytes(b"\0\0")
    beat = Beat.attach(short)
    assert beat is not None and beat.last() == 0.0
    beat.close()
    path = tmp_path / "cut.beat"
    live, fd = Beat.create(path)
    worker = mmap.mmap(fd, BEAT_SIZE)
    write_beat(worker, 5.0)
    assert live.last() == 5.0
    os.truncate(path, 0)  # cut under the worker's map: the daemon reads "no beat", no SIGBUS
    assert live.last() == 0.0
    worker.close()
    os.close(fd)
    live.close()


def test_the_page_carries_the_workers_own_health_checks(tmp_path: Path) -> None:
    path = tmp_path / "h.beat"
    beat, fd = Beat.create(path)
    worker = mmap.mmap(fd, BEAT_SIZE)
    try:
        assert beat.read() == BeatPage(0.0, False, 0, 0.0)  # a new page: no checks of its own
        mark_pushes_health(worker)
        write_beat(worker, 7.0)
        write_healthy(worker, 3, 0.25)
        assert beat.read() == BeatPage(7.0, True, 3, 0.25)
        write_healthy(worker, 2**32 + 1, 0.5)  # the count wraps at 32 bits
        assert beat.read().healthy == 1
        mark_pushes_health(worker, pushes=False)  # the daemon probes it again
        assert not beat.read().pushes_health
    finally:
        worker.close()
        os.close(fd)
        beat.close()


def test_an_older_workers_eight_byte_page_reads_as_beats_alone(tmp_path: Path) -> None:
    old = tmp_path / "old.beat"
    old.write_bytes(struct.pack("<d", 12.5))
    beat = Beat.attach(old)
    assert beat is not None
    assert beat.read() == BeatPage(12.5, False, 0, 0.0)
    beat.close()
