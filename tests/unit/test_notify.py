"""sd_notify: the Notifier against real AF_UNIX datagram sockets, and the loop's watchdog."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osk_daemon.observability.notify import Notifier, Watchdog

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def pending(sock: socket.socket) -> list[str]:
    """Every datagram already queued, without waiting."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


@pytest.fixture
def made() -> Iterator[list[Notifier]]:
    """Notifiers a test makes, closed after it (each holds a socket once it sent)."""
    notifiers: list[Notifier] = []
    yield notifiers
    for n in notifiers:
        n.close()


def keep(made: list[Notifier], n: Notifier) -> Notifier:
    made.append(n)
    return n


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines())


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None  # no socket, no pings
    assert n.notify(READY=1) is False
    n.ready()
    n.status("x")
    n.watchdog()
    n.stopping()


def test_path_socket_gets_ready_status_and_no_repeated_status(
    receiver: tuple[socket.socket, str], made: list[Notifier]
) -> None:
    sock, path = receiver
    n = keep(made, Notifier.from_environ({"NOTIFY_SOCKET": path}))
    n.ready("running 1 plugin, 1 healthy")
    assert fields(sock.recv(4096).decode()) == {
        "READY": "1",
        "STATUS": "running 1 plugin, 1 healthy",
    }
    n.status("running 1 plugin, 1 healthy")  # unchanged: not sent again
    n.status("line one\nline two")
    assert pending(sock) == ["STATUS=line one line two\n"]
    assert n.ready_sent


def test_abstract_socket_name(made: list[Notifier]) -> None:
    name = f"osk-notify-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        keep(made, Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1\n"


def test_reloading_carries_clock_monotonic_microseconds(
    receiver: tuple[socket.socket, str], made: list[Notifier]
) -> None:
    sock, path = receiver
    n = keep(made, Notifier(path))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = fields(sock.recv(4096).decode())
    assert got["RELOADING"] == "1"
    assert before <= int(got["MONOTONIC_USEC"]) <= after


def test_reload_cycle_ends_with_ready_only_once_ready_was_announced(
    receiver: tuple[socket.socket, str], made: list[Notifier]
) -> None:
    sock, path = receiver
    n = keep(made, Notifier(path))
    n.status("starting")
    pending(sock)
    with n.reload_cycle():
        pass
    during_boot = [fields(m) for m in pending(sock)]
    assert [m.get("RELOADING") for m in during_boot] == ["1", None]
    assert during_boot[-1] == {"STATUS": "starting"}  # the status comes back, no READY
    n.ready("running")
    pending(sock)
    with pytest.raises(RuntimeError), n.reload_cycle():
        raise RuntimeError("a refused reload")
    after_ready = [fields(m) for m in pending(sock)]
    assert after_ready[0]["RELOADING"] == "1"
    assert after_ready[1] == {"READY": "1", "STATUS": "running"}


def test_no_ready_after_stopping(receiver: tuple[socket.socket, str], made: list[Notifier]) -> None:
    sock, path = receiver
    n = keep(made, Notifier(path))
    n.stopping("critical plugin db/0 failed to start")
    assert fields(sock.recv(4096).decode()) == {
        "STOPPING": "1",
        "STATUS": "stopping: critical plugin db/0 failed to start",
    }
    n.ready()
    with n.reload_cycle():
        pass
    assert not any("READY=1" in m for m in pending(sock))


def test_a_failed_send_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, made: list[Notifier]
) -> None:
    n = keep(made, Notifier(str(tmp_path / "nobody-listens.sock")))
    with caplog.at_level(logging.DEBUG, logger="osk.notify"):
        results = [n.notify(WATCHDOG=1) for _ in range(3)]
    assert results == [False, False, False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()


def test_an_address_that_is_no_unix_path_disables_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="osk.notify"):
        n = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.1),  # ours (pid=4242)
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_period_and_only_for_our_pid(
    env: dict[str, str], interval: float | None
) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify", **env}, pid=4242)
    assert n.watchdog_interval == interval


def test_watchdog_pings_come_from_the_loop_and_stop_while_it_stalls(
    receiver: tuple[socket.socket, str], made: list[Notifier]
) -> None:
    sock, path = receiver
    sock.setblocking(False)
    n = keep(made, Notifier(path, watchdog_usec=40_000))  # a ping every 20 ms

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(n, loop)
        watchdog.start()
        try:
            for _ in range(3):
                got = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                assert got == b"WATCHDOG=1\n"
            pending(sock)
            time.sleep(0.3)  # noqa: ASYNC251 - the stall under test: the loop blocked 15 periods
            assert pending(sock) == []  # nothing pinged while the loop could not run
            got = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            assert got == b"WATCHDOG=1\n"  # and the pings resume with the loop
        finally:
            watchdog.cancel()

    asyncio.run(main())
