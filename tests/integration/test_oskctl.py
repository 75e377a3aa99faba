"""``oskctl`` as a user runs it: a subprocess against a real control server.

The server (``FakeHandler`` with fixed answers) runs on an event loop in a background
thread, so the blocking ``subprocess.run`` here does not starve it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from osk_daemon.control import render
from osk_daemon.control.oskctl import EXIT_BROKEN_PIPE
from tests.integration.test_control_socket import (
    EVENTS,
    LOG_ITEMS,
    STATUS_ROWS,
    FakeHandler,
    running_in_thread,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.integration]

DEADLINE = 20.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSK_")}
    env.update(extra)
    return env


def oskctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "osk_daemon.control.oskctl", *args],
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@pytest.fixture
def handler() -> FakeHandler:
    return FakeHandler()


@pytest.fixture
def daemon(tmp_path: Path, handler: FakeHandler) -> Iterator[Path]:
    path = tmp_path / "ctl.sock"
    with running_in_thread(path, handler):
        yield path


def test_status_prints_a_table(daemon: Path) -> None:
    result = oskctl("--socket", str(daemon), "status")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == render.format_status(STATUS_ROWS) + "\n"
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        *("PLUGIN", "INSTANCE", "VERSION", "PID", "STATE", "HEALTH"),
        *("RESTARTS", "UPTIME", "LAST", "EXIT"),
    ]
    assert lines[1].split() == ["echo", "0", "1.2.0", "4242", "running", "ok", "0", "5m12s", "-"]
    assert lines[2].split() == [
        *("indexer", "1", "0.3.1", "-", "backoff", "-", "4", "-", "exit", "1"),
    ]


@pytest.mark.parametrize("where", ["before", "after"])
def test_status_json_is_exactly_the_result(daemon: Path, where: str) -> None:
    args = ["--json", "status", "echo"] if where == "before" else ["status", "echo", "--json"]
    result = oskctl("--socket", str(daemon), *args)
    assert result.returncode == 0
    assert result.stdout == json.dumps([STATUS_ROWS[0]], indent=2) + "\n"


def test_a_daemon_error_exits_1(daemon: Path) -> None:
    result = oskctl("--socket", str(daemon), "status", "nope")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "oskctl: unavailable: no plugin named 'nope'\n"
    result = oskctl("--socket", str(daemon), "call", "p", "fail")
    assert (result.returncode, result.stderr) == (1, "oskctl: remote: kaput\n")


def test_call_prints_json(daemon: Path) -> None:
    result = oskctl("--socket", str(daemon), "call", "p", "echo", '{"x": [1, 2]}', "--timeout", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == json.dumps({"args": {"x": [1, 2]}, "timeout": 3.0}, indent=2) + "\n"
    result = oskctl("--socket", str(daemon), "call", "p", "hello")
    assert (result.returncode, result.stdout) == (0, '"hello"\n')


@pytest.mark.parametrize(
    "args",
    [
        ["call", "p", "m", "{oops"],
        ["frobnicate"],
        [],
        ["logs"],
        ["status", "--timeout", "-1"],
    ],
)
def test_bad_usage_exits_2(daemon: Path, args: list[str]) -> None:
    result = oskctl("--socket", str(daemon), *args)
    assert result.returncode == 2
    assert "usage: oskctl" in result.stderr


def test_start_stop_restart_and_shutdown_print_the_answer(daemon: Path) -> None:
    for cmd in ("start", "stop", "restart"):
        result = oskctl("--socket", str(daemon), cmd, "echo", "--instance", "2")
        assert (result.returncode, result.stdout) == (0, f"{cmd} echo instance=2: ok\n")
    result = oskctl("--socket", str(daemon), "start", "echo", "--json")
    assert result.stdout == '"start echo instance=None: ok"\n'
    result = oskctl("--socket", str(daemon), "shutdown")
    assert (result.returncode, result.stdout) == (0, "shutting down\n")


def test_logs_and_events(daemon: Path) -> None:
    result = oskctl("--socket", str(daemon), "logs", "echo", "-n", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [render.format_log_line(i) for i in LOG_ITEMS[-2:]]
    assert result.stdout.splitlines()[-1].endswith(" echo/0 l4")
    result = oskctl("--socket", str(daemon), "events", "-f")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == EVENTS


def test_ctrl_c_during_follow_exits_130_quietly(daemon: Path, handler: FakeHandler) -> None:
    cmd = [sys.executable, "-m", "osk_daemon.control.oskctl", "--socket", str(daemon)]
    with subprocess.Popen(
        [*cmd, "logs", "echo", "-f"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        try:
            out = b""
            while out.count(b"\n") < len(LOG_ITEMS):
                ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
                assert ready, f"oskctl printed only {out!r}"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"oskctl ended early: {out!r}"
                out += chunk
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130
    assert err == b""
    assert out.decode().splitlines() == [render.format_log_line(i) for i in LOG_ITEMS]
    assert handler.stream_closed.wait(DEADLINE), "the daemon kept the follow stream open"


def test_a_missing_socket_exits_3_with_a_hint(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    result = oskctl("--socket", str(missing), "status")
    assert result.returncode == 3
    assert str(missing) in result.stderr and "from --socket" in result.stderr
    result = oskctl("status", env=_env(OSK_SOCKET=str(missing)))
    assert result.returncode == 3
    assert "from $OSK_SOCKET" in result.stderr


def test_a_silent_daemon_times_out_with_4(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(os.fspath(path))
        silent.listen(8)  # connections queue in the backlog and are never answered
        result = oskctl("--socket", str(path), "--timeout", "0.3", "status")
    assert result.returncode == 4
    assert "timed out" in result.stderr


def test_socket_from_environment(daemon: Path) -> None:
    result = oskctl("status", "--json", env=_env(OSK_SOCKET=str(daemon)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == STATUS_ROWS


def test_socket_from_config(tmp_path: Path, handler: FakeHandler) -> None:
    config = tmp_path / "etc" / "osk.toml"
    config.parent.mkdir()
    config.write_text('[daemon]\nruntime_dir = "../rt"\n')
    with running_in_thread(tmp_path / "rt" / "control.sock", handler):
        result = oskctl("--config", str(config), "status", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == STATUS_ROWS
        result = oskctl("status", env=_env(OSK_CONFIG=str(config)))
        assert result.returncode == 0, result.stderr
    config.write_text('[daemon]\ncontrol_socket = "gone.sock"\n')
    result = oskctl("--config", str(config), "status")
    assert result.returncode == 3
    assert str(tmp_path / "etc" / "gone.sock") in result.stderr
    assert "control_socket" in result.stderr


def test_oskctl_imports_no_heavy_dependencies() -> None:
    code = (
        "import sys, osk_daemon.control.oskctl\n"
        "print([m for m in ('anyio', 'pydantic', 'zmq', 'msgpack', 'psutil') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, check=True
    )
    assert result.stdout == "[]\n"


def test_parsing_a_command_imports_neither_shutil_nor_importlib() -> None:
    # argparse's formatter would import shutil (and zlib, bz2, lzma) for the terminal width
    code = (
        "import sys\n"
        "from osk_daemon.control import oskctl\n"
        "ns = oskctl.build_parser(['status']).parse_args(['status', '--json'])\n"
        "print(ns.command, [m for m in ('shutil', 'importlib', 'typing') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, check=True
    )
    assert result.stdout == "status []\n"


@pytest.mark.parametrize(
    ("columns", "expected"), [("132", 132), ("junk", 80), ("0", 80), (None, 80)]
)
def test_help_width_follows_columns_like_shutil(
    monkeypatch: pytest.MonkeyPatch, columns: str | None, expected: int
) -> None:
    from osk_daemon.control import oskctl as cli

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)

    def no_terminal(fd: int) -> os.terminal_size:
        raise OSError(25, "not a terminal")

    monkeypatch.setattr(os, "get_terminal_size", no_terminal)
    assert cli._columns() == expected


def test_a_reader_that_left_gets_no_traceback_and_the_broken_pipe_code(daemon: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # gone before oskctl writes a byte: its print fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "osk_daemon.control.oskctl", "--socket", str(daemon), "status"],
            env=_env(),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
    finally:
        os.close(write)
    assert result.returncode == EXIT_BROKEN_PIPE
    assert result.stderr == ""  # neither a traceback nor the flush at exit complained
