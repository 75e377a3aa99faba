"""Counter files kept open and re-read with pread (isolation.cgroupfs.KeptFiles)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from osk_daemon.isolation.cgroupfs import KeptFiles

pytestmark = pytest.mark.timeout(10)


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


@pytest.fixture
def budget() -> Iterator[None]:
    saved = KeptFiles._budget
    yield
    KeptFiles._budget = saved


def test_a_kept_file_is_read_afresh_through_one_fd(tmp_path: Path, budget: None) -> None:
    KeptFiles._budget = 1000
    counter = tmp_path / "memory.current"
    counter.write_text("5\n")
    files, before = KeptFiles(), _open_fds()
    assert files.read_int(str(counter)) == 5
    assert _open_fds() == before + 1  # opened once, kept
    counter.write_text("7\n")  # the kernel renders a cgroup file afresh at offset 0 too
    assert files.read_int(str(counter)) == 7
    assert _open_fds() == before + 1
    files.close()
    assert _open_fds() == before
    counter.write_text("max\n")
    assert files.read_int(str(counter)) is None  # closed: plain reads go on working
    assert _open_fds() == before
    assert files.read_keyed(str(tmp_path / "gone")) is None  # missing: None, as plainly


def test_past_the_budget_files_are_read_plainly(tmp_path: Path, budget: None) -> None:
    KeptFiles._budget = 0  # as if the daemon's fds were a scarce resource already
    events = tmp_path / "pids.events"
    events.write_text("max 3\n")
    files, before = KeptFiles(), _open_fds()
    assert files.read_keyed(str(events)) == {"max": 3}
    assert _open_fds() == before


def test_a_dropped_one_closes_its_fds(tmp_path: Path, budget: None) -> None:
    KeptFiles._budget = 1000
    counter = tmp_path / "pids.current"
    counter.write_text("1\n")
    before = _open_fds()
    files = KeptFiles()
    assert files.read_int(str(counter)) == 1
    assert _open_fds() == before + 1
    del files  # a cgroup object nobody closed: its kept fds must not outlive it
    assert _open_fds() == before
