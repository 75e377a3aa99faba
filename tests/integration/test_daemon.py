"""A real daemon with real plugin processes: the operator's view of the basics."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time

import pytest
import zmq

from osk_daemon.ipc.client import Client
from tests.integration.harness import (
    ControlError,
    alive,
    daemon_config,
    plugin_block,
    running_daemon,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def basic_config(**daemon: object) -> str:
    return daemon_config(
        plugin_block("echo", instances=2, version="1.0.0") + plugin_block("viaexec", spawn="exec"),
        **daemon,
    )


def test_status_call_and_kill_9_restart() -> None:
    with running_daemon(basic_config()) as d:
        rows = d.status()
        assert [(r["plugin"], r["instance"]) for r in rows] == [
            ("echo", 0),
            ("echo", 1),
            ("viaexec", 0),
        ]
        for r in rows:
            assert r["state"] == "ready"
            assert isinstance(r["pid"], int)
            assert r["restarts"] == 0
        assert rows[0]["version"] == "1.0.0"
        first = d.row("echo", 0)["pid"]
        # calls reach the plugin process and come back
        answer = d.call("echo", "echo", {"text": "hi"})
        assert answer["text"] == "hi"
        assert answer["pid"] in {rows[0]["pid"], rows[1]["pid"]}
        # kill -9: the same slot comes back with a new pid that answers
        os.kill(first, signal.SIGKILL)
        d.wait_until(
            lambda: (r := d.row("echo", 0))["state"] == "ready" and r["pid"] != first,
            what="echo/0 back with a new pid",
        )
        row = d.row("echo", 0)
        assert row["restarts"] == 1
        assert row["last_exit"] == "SIGKILL"
        answering = {d.call("echo", "pid") for _ in range(6)}
        assert answering <= {r["pid"] for r in d.status("echo")}


def test_exec_spawned_plugin_answers() -> None:
    with running_daemon(basic_config()) as d:
        assert d.call("viaexec", "echo", {"text": "x"})["text"] == "x"


def test_external_client_api_talks_to_the_broker() -> None:
    with (
        running_daemon(basic_config()) as d,
        Client(f"ipc://{d.runtime}/broker.sock", timeout=5) as client,
    ):
        assert client.call("echo", "echo", {"text": "c"})["text"] == "c"
        results = client.call_many([("echo", "echo", {"text": str(i)}) for i in range(50)])
        assert [r["text"] for r in results] == [str(i) for i in range(50)]
        with pytest.raises(Exception, match="no method"):
            client.call("echo", "nope")


def test_plugin_output_reaches_logs_with_names() -> None:
    with running_daemon(basic_config()) as d:
        oskctl = [sys.executable, "-m", "osk_daemon.control.oskctl", "--socket", str(d.socket)]
        follow = subprocess.Popen(
            [*oskctl, "logs", "echo", "-f"],  # the tail, then live: no race with the print
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = f"marker-{os.getpid()}-out", f"marker-{os.getpid()}-err"
        try:
            out_instance = d.call("echo", "say", {"text": out})
            err_instance = d.call("echo", "say", {"text": err, "stream": "stderr"})
            shown = read_until(follow, {out, err})
        finally:
            follow.kill()
            follow.communicate(timeout=10)
        assert shown[out].endswith(f" echo/{out_instance} {out}")
        assert shown[err].endswith(f" echo/{err_instance} {err}")
        # the control command keeps plugin, instance and stream with each line
        lines = {
            (x["plugin"], x["instance"], x["stream"], x["line"])
            for x in d.ctl("logs", name="echo", lines=1000)
        }
        assert ("echo", out_instance, "stdout", out) in lines
        assert ("echo", err_instance, "stderr", err) in lines
        # the daemon's own log tags each line (it is written before oskctl can see it)
        log = d.log.read_text()
        assert f"[echo/{out_instance}] {out}" in log
        assert f"[echo/{err_instance}] {err}" in log


def read_until(
    proc: subprocess.Popen[bytes], needles: set[str], timeout: float = 20.0
) -> dict[str, str]:
    """For each needle, the first line of ``proc``'s stdout containing it. Waits on the raw
    fd (so no Python buffer hides lines from select), up to a deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    found: dict[str, str] = {}
    buf = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        *lines, buf = buf.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            for needle in needles - found.keys():
                if needle in text:
                    found[needle] = text
        if found.keys() == needles:
            return found
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"oskctl logs -f ended: {proc.communicate()[1]!r}")
        buf += chunk
    raise AssertionError(f"{needles - found.keys()} did not appear in oskctl logs -f")


def test_errors_are_refused_not_fatal() -> None:
    with running_daemon(basic_config()) as d:
        with pytest.raises(ControlError, match="no method"):
            d.call("echo", "missing")
        with pytest.raises(ControlError) as err:
            d.call("ghost", "echo")
        assert err.value.code == "unavailable"
        with pytest.raises(ControlError) as err:
            d.ctl("frobnicate")
        assert err.value.code == "control"
        assert d.call("echo", "echo", {"text": "still here"})["text"] == "still here"


def test_garbage_frames_on_the_broker_socket_do_not_crash_it() -> None:
    with running_daemon(basic_config()) as d:
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{d.runtime}/broker.sock")
            for frames in ([b"x"], [b"\xc1\xc1", b""], [b"a", b"b", b"c"], [os.urandom(300), b""]):
                sock.send_multipart(frames)
            sock.send_multipart([b"\x00" * (17 * 1024 * 1024), b""])  # over max_message_size
            sock.close(0)
        finally:
            ctx.term()
        assert d.call("echo", "echo", {"text": "alive"})["text"] == "alive"
        assert d.proc is not None and d.proc.poll() is None


def test_control_socket_is_0600() -> None:
    with running_daemon(basic_config()) as d:
        mode = stat.S_IMODE(d.socket.stat().st_mode)
        assert mode == 0o600
        assert stat.S_IMODE(d.runtime.stat().st_mode) == 0o711
        assert stat.S_IMODE((d.runtime / "broker.sock").stat().st_mode) == 0o600


def test_shutdown_command_stops_everything() -> None:
    with running_daemon(basic_config()) as d:
        pids = [r["pid"] for r in d.status()]
        d.ctl("shutdown")
        assert d.proc is not None
        assert d.proc.wait(30) == 0
        for pid in pids:
            assert not alive(pid)


def test_check_config_names_file_key_and_reason(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "bad.toml"
    path.write_text('[plugins.echo]\nentry = "m:C"\n[plugins.echo.health_check]\ninterval = -1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "osk_daemon.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "bad.toml: plugins.echo.health_check.interval: must be > 0" in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "osk_daemon.cli", "check-config", "configs/demo.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr


def test_schema_command_prints_json_schema() -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "osk_daemon.cli", "schema"], capture_output=True, check=True
    ).stdout
    schema = json.loads(out)
    assert "plugins" in schema["properties"]
