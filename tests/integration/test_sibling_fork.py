"""``sibling.fork_sibling``: a real clone(CLONE_PARENT) whose child is the test's own.

A helper process (``sibling_child``) plays the zygote: it forks a sibling and exits. The
test process, its parent, must then be the sibling's parent: it reaps it by pid and reads
its exact exit code, with no subreaper set.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osk_daemon.supervisor import sibling

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 10.0

unavailable = sibling.sibling_fork_unavailable()
needs_sibling = pytest.mark.skipif(
    unavailable is not None, reason=f"no sibling fork: {unavailable}"
)


def _reap(pid: int) -> int:
    """Wait (bounded) for our child ``pid`` and return its exit code."""
    pidfd = os.pidfd_open(pid)
    try:
        assert select.select([pidfd], [], [], DEADLINE)[0], f"child {pid} did not exit"
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_sibling
def test_the_sibling_is_our_child_with_its_own_thread_records() -> None:
    read, write = os.pipe()
    try:
        helper = subprocess.run(
            [sys.executable, "-m", "tests.integration.sibling_child", str(write)],
            cwd=ROOT,
            pass_fds=(write,),
            timeout=DEADLINE,
            check=True,
        )
        assert helper.returncode == 0
        os.close(write)
        write = -1
        lines: list[bytes] = []
        deadline = time.monotonic() + DEADLINE
        while len(lines) < 2 and time.monotonic() < deadline:  # the child's line may lag
            chunk = os.read(read, 65536)
            if not chunk:
                break
            lines += chunk.splitlines()
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    reports = {k: v for line in lines for k, v in json.loads(line).items()}
    parent, child = reports["parent"], reports["child"]
    assert child["pid"] == parent["child"]
    assert _reap(child["pid"]) == 7  # ours to reap: exact status, no subreaper needed
    assert child["ppid"] == os.getpid()
    assert child["tid_record"] == child["pid"]  # glibc's cached tid is the child's own
    assert child["thread_ran"] and child["reentered"]
    assert parent["hooks"] == ["before", "parent"]  # os.register_at_fork hooks, as os.fork
    assert child["hooks"] == ["before", "child"]
    assert child["robust_list"] == parent["robust_list"]


def test_an_unknown_architecture_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.uname()
    fake = os.uname_result((*real[:4], "pdp11"))
    monkeypatch.setattr(os, "uname", lambda: fake)
    reason = sibling._load()
    assert isinstance(reason, str) and "pdp11" in reason
