"""The state file a daemon leaves for the next one, and how a record is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from osk_daemon.config import PluginConfig
from osk_daemon.supervisor.runtime_state import (
    STATE_FILE,
    InstanceRecord,
    StateFile,
    config_fingerprint,
    load,
    start_ticks,
    verify,
)

pytestmark = pytest.mark.timeout(10)


def record(pid: int, ticks: int) -> InstanceRecord:
    return InstanceRecord(
        plugin="echo",
        index=0,
        version="1.0.0",
        pid=pid,
        start_ticks=ticks,
        token="t" * 32,
        fingerprint="f",
        state="ready",
        stdout="/x.out",
        stderr="/x.err",
    )


def test_start_ticks_reads_field_22_even_when_the_name_has_spaces_and_parens() -> None:
    # a process named ") x (" must not shift the fields
    code = (
        "import ctypes, sys; ctypes.CDLL(None).prctl(15, b') x (', 0, 0, 0); "  # PR_SET_NAME
        "print(flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()  # named now
        assert Path(f"/proc/{child.pid}/comm").read_text() == ") x (\n"
        ticks = start_ticks(child.pid)
        own = start_ticks(os.getpid())
        assert ticks is not None and own is not None and ticks >= own
    finally:
        child.communicate(b"")
    assert start_ticks(child.pid) is None  # reaped: no such process


def test_verify_opens_a_pidfd_only_for_the_same_process() -> None:
    me = record(os.getpid(), start_ticks(os.getpid()) or 0)
    pidfd = verify(me)
    assert pidfd is not None
    os.close(pidfd)
    assert verify(replace(me, start_ticks=me.start_ticks + 1)) is None  # a reused pid
    assert verify(replace(me, pid=2**22 + 1)) is None  # above pid_max: no such process


@pytest.mark.anyio
async def test_changes_make_one_write_and_the_state_file_reads_back(
    tmp_path: Path,
) -> None:
    records = [record(1, 2), replace(record(3, 4), index=1)]
    sf = StateFile(tmp_path, lambda: [r.encode() for r in records])
    for _ in range(5):
        sf.dirty()
    sf.write()  # what the timer dirty() armed would do (and it cancels that timer)
    sf.flush()
    assert sf.writes == 1
    assert load(tmp_path) == records
    sf.remove()
    assert load(tmp_path) == []


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps([1, 2]), json.dumps({"format": 99, "instances": []})],
)
def test_a_bad_state_file_means_nothing_to_adopt(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    assert load(tmp_path) == []


def test_a_bad_record_is_skipped_and_the_others_kept(tmp_path: Path) -> None:
    good = record(1, 2)
    body = {"format": 1, "instances": [{"plugin": "x"}, good.__dict__]}
    (tmp_path / STATE_FILE).write_text(json.dumps(body))
    assert load(tmp_path) == [good]


def test_the_fingerprint_changes_with_the_config_but_not_with_the_instance_count() -> None:
    base = PluginConfig.model_validate({"entry": "m:C"})
    assert config_fingerprint(base) == config_fingerprint(base.model_copy(update={"instances": 3}))
    other = PluginConfig.model_validate({"entry": "m:C", "env": {"A": "1"}})
    assert config_fingerprint(base) != config_fingerprint(other)
