"""The shared-memory heartbeat page (ipc.beats): what the worker stores, the daemon reads."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from osk_daemon.ipc.beats import BEAT_SIZE, Beat, beat_path, write_beat

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
        adopted = Beat.attach(path)  # a restarted daemon maps the same page by its path
        assert adopted is not None and adopted.last() == 1234.5
        write_beat(worker, 1240.25)
        assert adopted.last() == 1240.25
        worker.close()
    finally:
        os.close(fd)
    beat.close()
    assert not path.exists()  # the life is over: its page goes


def test_attach_without_a_usable_page_is_none(tmp_path: Path) -> None:
    assert Beat.attach(tmp_path / "missing.beat") is None
    short = tmp_path / "short.beat"
    short.write_bytes(b"\0\0")
    assert Beat.attach(short) is None  # not a page this daemon made
