"""The worker runtime as a real process, with the test playing the daemon's ROUTER.

Each test writes a plugin module into ``tmp_path``, starts ``run_worker`` in a fresh
interpreter connected to a ROUTER bound on ``ipc://``, and speaks the wire protocol
directly. Waiting is always on the socket (poll with a deadline) or on the pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from osk_daemon.errors import Unavailable
from osk_daemon.ipc.codec import Header, Kind, encode_header, pack, split_batch, unpack

pytestmark = [pytest.mark.timeout(30), pytest.mark.integration]

PLUGIN_SOURCE = """
import asyncio
import time
from pathlib import Path

from osk_daemon.errors import OskError
from osk_daemon.worker import Health, HealthStatus, Plugin, rpc


class Echo(Plugin):
    async def start(self):
        self.state = getattr(self, "state", None)

    async def stop(self):
        marker = self.ctx.config.get("marker")
        if marker:
            Path(marker).write_text("stopped")

    async def import_state(self, state):
        self.state = state

    async def export_state(self):
        return {"exported": self.state}

    @rpc
    def echo(self, value=None):
        return value

    @rpc
    def add(self, a, b):
        return a + b

    @rpc(name="info.config")
    def config(self):
        return {"config": self.ctx.config, "instance": self.ctx.instance}

    @rpc
    def fail(self):
        raise ValueError("bad value")

    @rpc
    async def slow_double(self, x):
        await asyncio.sleep(0)
        return x * 2

    @rpc
    def block(self, seconds):
        time.sleep(seconds)
        return "unblocked"

    @rpc
    def unpackable(self):
        return object()

    @rpc
    async def relay(self, x):
        return {"other": await self.ctx.call("other", "double", {"x": x}, timeout=5)}

    @rpc
    async def relay_error(self):
        try:
            await self.ctx.call("other", "missing")
        except OskError as exc:
            return exc.code
        return "no error"

    @rpc
    def announce(self, what):
        self.ctx.emit("thing.happened", {"what": what})
        return True

    @rpc
    def announce_and_block(self, seconds):
        self.ctx.emit("blocking")  # queued on the socket before the loop stalls
        time.sleep(seconds)
        return "unblocked"

    @rpc
    def forge(self, event):
        self.ctx.emit(event, {"message": "forged"})
        return "emitted"


class Big(Echo):
    @rpc
    def big(self, n):
        return "x" * n


class StuckStart(Echo):
    async def start(self):
        await asyncio.Event().wait()


class Degraded(Echo):
    async def health(self):
        return Health.degraded("disk almost full")


class Sick(Echo):
    async def health(self):
        return False


class BrokenStart(Plugin):
    async def start(self):
        raise RuntimeError("database is down")


class NotAPlugin:
    pass
"""


class FakeDaemon:
    """A ROUTER that records the worker's routing id and speaks frames with deadlines.

    A message from the worker may be a batch of pairs (answers of one loop pass); ``recv``
    hands them out one by one, in order."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.peer = b""
        self.heartbeats: list[float] = []
        self.batches: list[int] = []  # pairs per message received
        self._waiting: deque[tuple[Header, bytes]] = deque()

    def recv(self, timeout: float = 10.0, *, keep_heartbeats: bool = False) -> tuple[Header, Any]:
        """Next non-heartbeat frame (heartbeat arrival times are recorded)."""
        deadline = time.monotonic() + timeout
        while self._waiting or (left := deadline - time.monotonic()) > 0:
            if not self._waiting:
                if not self.sock.poll(int(left * 1000) + 1):
                    continue
                frames = self.sock.recv_multipart()
                self.peer = frames[0]
                self._waiting.extend(split_batch(frames, 1))
                self.batches.append(len(frames) // 2)
            header, body = self._waiting.popleft()
            if header.kind is Kind.HEARTBEAT:
                self.heartbeats.append(time.monotonic())
                if not keep_heartbeats:
                    continue
            return header, unpack(body) if body else None  # empty: a STATE's ask
        raise TimeoutError("no frame from the worker in time")

    def recv_kind(self, kind: Kind, timeout: float = 10.0) -> tuple[Header, Any]:
        header, body = self.recv(timeout)
        assert header.kind is kind, (header, body)
        return header, body

    def send(self, kind: Kind, body: Any = None, id: int = 0, **header: Any) -> None:
        self.sock.send_multipart([self.peer, encode_header(kind, id, **header), pack(body)])

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.peer, *frames])

    def request(
        self, id: int, method: str, args: Any = None, deadline: float | None = None
    ) -> None:
        if deadline is None:
            deadline = time.monotonic() + 10
        self.send(Kind.REQUEST, args, id, target="echo", method=method, deadline=deadline)

    def call(self, method: str, args: Any = None, id: int = 7) -> tuple[Header, Any]:
        self.request(id, method, args)
        header, body = self.recv()
        assert header.id == id, (header, body)
        return header, body


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        (tmp_path / "plug.py").write_text(PLUGIN_SOURCE)
        self.endpoint = f"ipc://{tmp_path}/b.sock"
        self.zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.daemon = FakeDaemon(self.zctx, self.endpoint)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stderr_path = tmp_path / "stderr.log"

    def spec(self, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "plugin": "echo",
            "instance": 1,
            "version": "1.2.3",
            "entry": "plug:Echo",
            "path": [str(self.tmp_path)],
            "config": {"marker": str(self.tmp_path / "stopped"), "greeting": "hi"},
            "endpoint": self.endpoint,
            "token": "s3cret",
            "heartbeat_interval": 0.2,
            "max_message_size": 1 << 20,
            "call_timeout": 5.0,
            "log_level": "DEBUG",
        }
        spec.update(overrides)
        return spec

    def start(self, **overrides: Any) -> subprocess.Popen[bytes]:
        code = (
            "import json,sys; from osk_daemon.worker.runtime import run_worker; "
            "run_worker(json.loads(sys.argv[1]))"
        )
        with self.stderr_path.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(self.spec(**overrides))], stderr=err
            )
        self.procs.append(proc)
        return proc

    def start_ready(self, **overrides: Any) -> tuple[subprocess.Popen[bytes], Any]:
        proc = self.start(**overrides)
        self.daemon.recv_kind(Kind.HELLO)
        _, ready = self.daemon.recv_kind(Kind.READY)
        return proc, ready

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self.daemon.sock.close()
        self.zctx.term()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def test_hello_then_ready(h: Harness) -> None:
    proc = h.start()
    hello, body = h.daemon.recv_kind(Kind.HELLO)
    assert hello.target == "echo"
    assert body == {
        "plugin": "echo",
        "instance": 1,
        "token": "s3cret",
        "pid": proc.pid,
        "version": "1.2.3",
    }
    _, ready = h.daemon.recv_kind(Kind.READY)
    assert ready["methods"] == sorted(
        [
            "add",
            "announce",
            "announce_and_block",
            "block",
            "echo",
            "fail",
            "forge",
            "info.config",
            "relay",
            "relay_error",
            "slow_double",
            "unpackable",
        ]
    )


def test_requests_and_argument_mapping(h: Harness) -> None:
    h.start_ready()
    header, body = h.daemon.call("echo", {"value": "hello"}, id=11)
    assert (header.kind, header.id, body) == (Kind.REPLY, 11, "hello")
    assert h.daemon.call("add", {"a": 2, "b": 3})[1] == 5
    assert h.daemon.call("add", [10, 20])[1] == 30
    assert h.daemon.call("echo", [[1, 2]])[1] == [1, 2]
    assert h.daemon.call("echo", 42)[1] == 42
    assert h.daemon.call("echo")[1] is None
    info = h.daemon.call("info.config")[1]
    assert info["config"]["greeting"] == "hi"
    assert info["instance"] == 1
    assert h.daemon.call("osk.methods")[1][0] == "add"


def test_errors(h: Harness) -> None:
    h.start_ready()
    header, body = h.daemon.call("nope")
    assert header.kind is Kind.ERROR
    assert body["code"] == "no_method"
    assert "'nope'" in body["message"] and "echo, fail" in body["message"]

    header, body = h.daemon.call("fail")
    assert header.kind is Kind.ERROR
    assert body["code"] == "remote"
    assert (body["remote_type"], body["message"]) == ("ValueError", "bad value")

    header, body = h.daemon.call("add", {"a": 1})
    assert header.kind is Kind.ERROR
    assert body["remote_type"] == "TypeError"

    header, body = h.daemon.call("unpackable")
    assert header.kind is Kind.ERROR
    assert body["remote_type"] == "TypeError"
    assert "cannot send" in body["message"]


def test_async_handlers_run_concurrently_with_sync_ones(h: Harness) -> None:
    h.start_ready()
    for i in range(5):
        h.daemon.request(100 + i, "slow_double", {"x": i})
    replies = {}
    for _ in range(5):
        header, body = h.daemon.recv()
        assert header.kind is Kind.REPLY
        replies[header.id] = body
    assert replies == {100 + i: 2 * i for i in range(5)}


def test_health(h: Harness) -> None:
    h.start_ready()
    h.daemon.send(Kind.HEALTH, id=3)
    header, body = h.daemon.recv_kind(Kind.HEALTH_REPLY)
    assert header.id == 3
    assert body == {"status": "healthy", "detail": ""}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("plug:Degraded", {"status": "degraded", "detail": "disk almost full"}),
        ("plug:Sick", {"status": "unhealthy", "detail": ""}),
    ],
)
def test_health_degraded(h: Harness, entry: str, expected: dict[str, str]) -> None:
    h.start_ready(entry=entry)
    h.daemon.send(Kind.HEALTH, id=4)
    header, body = h.daemon.recv_kind(Kind.HEALTH_REPLY)
    assert (header.id, body) == (4, expected)


def test_heartbeats_repeat(h: Harness) -> None:
    h.start_ready(heartbeat_interval=0.05)
    while len(h.daemon.heartbeats) < 5:
        header, _ = h.daemon.recv(timeout=2.0, keep_heartbeats=True)
        assert header.kind is Kind.HEARTBEAT
    assert h.daemon.heartbeats == sorted(h.daemon.heartbeats)


def test_blocking_sync_handler_stops_heartbeats(h: Harness) -> None:
    """Heartbeats come from the event loop: none is sent while a sync handler blocks it.

    The handler emits an event, then blocks for 20 heartbeat intervals; the worker's frames
    arrive in the order it sent them, so no HEARTBEAT may sit between that event and the
    reply (a heartbeat thread would send ~20 there), and they resume after it.
    """
    h.start_ready(heartbeat_interval=0.05)
    header, _ = h.daemon.recv(keep_heartbeats=True)  # at least one heartbeat before blocking
    assert header.kind is Kind.HEARTBEAT
    h.daemon.request(9, "announce_and_block", {"seconds": 1.0})
    kinds: list[Kind] = []
    while True:
        header, body = h.daemon.recv(keep_heartbeats=True)
        kinds.append(header.kind)
        if header.kind is Kind.EVENT:
            assert header.method == "blocking"
            kinds = [Kind.EVENT]  # heartbeats before the handler started do not count
        if header.kind is Kind.REPLY:
            assert (header.id, body) == (9, "unblocked")
            break
    assert kinds == [Kind.EVENT, Kind.REPLY]
    header, _ = h.daemon.recv(keep_heartbeats=True)
    assert header.kind is Kind.HEARTBEAT  # heartbeats resume


def test_stop_runs_stop_and_exits_zero(h: Harness) -> None:
    proc, _ = h.start_ready()
    h.daemon.send(Kind.STOP)
    assert h.wait(proc) == 0
    assert (h.tmp_path / "stopped").read_text() == "stopped"


def test_sigterm_exits_zero(h: Harness) -> None:
    proc, _ = h.start_ready()
    os.kill(proc.pid, signal.SIGTERM)
    assert h.wait(proc) == 0
    assert (h.tmp_path / "stopped").read_text() == "stopped"


def test_start_raising_reports_start_failed(h: Harness) -> None:
    proc = h.start(entry="plug:BrokenStart")
    h.daemon.recv_kind(Kind.HELLO)
    _, body = h.daemon.recv_kind(Kind.START_FAILED)
    assert body["code"] == "plugin_load"
    assert "database is down" in body["message"]
    assert "RuntimeError" in body["traceback"]
    assert h.wait(proc) != 0


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("no_such_module:Thing", "no_such_module"),
        ("plug:Missing", "Missing"),
        ("plug:NotAPlugin", "not a subclass"),
        ("no-such-entry-point", "no entry point"),
    ],
)
def test_unloadable_entry_reports_start_failed(h: Harness, entry: str, needle: str) -> None:
    proc = h.start(entry=entry)
    h.daemon.recv_kind(Kind.HELLO)
    _, body = h.daemon.recv_kind(Kind.START_FAILED)
    assert body["code"] == "plugin_load"
    assert needle in body["message"]
    assert h.wait(proc) == 1


def test_entry_point_and_state_handover(h: Harness) -> None:
    dist = h.tmp_path / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[osk.plugins]\necho = plug:Echo\n")
    h.start(entry="echo", handover="0.9.0")
    h.daemon.recv_kind(Kind.HELLO)
    assert h.daemon.recv_kind(Kind.STATE)[1] is None  # it asks, before its start()
    h.daemon.send(Kind.STATE, {"count": 3})
    h.daemon.recv_kind(Kind.READY)
    assert h.daemon.call("osk.export_state")[1] == {"exported": {"count": 3}}
    h.daemon.send(Kind.STATE, {"count": 9})  # nobody asked for this one: dropped
    assert h.daemon.call("osk.export_state", id=8)[1] == {"exported": {"count": 3}}
    assert "dropped a hand-over state nobody asked for" in h.stderr()


@pytest.mark.parametrize("answer", [b"", b"\xc1not msgpack"])
def test_no_hand_over_state_starts_the_plugin_empty(h: Harness, answer: bytes) -> None:
    h.start(handover="0.9.0")
    h.daemon.recv_kind(Kind.HELLO)
    h.daemon.recv_kind(Kind.STATE)
    h.daemon.send_raw(encode_header(Kind.STATE, 0), answer)  # none, or one that is broken
    h.daemon.recv_kind(Kind.READY)
    assert h.daemon.call("osk.export_state")[1] == {"exported": None}


def test_ctx_call_round_trip(h: Harness) -> None:
    h.start_ready()
    h.daemon.request(21, "relay", {"x": 5})
    out, args = h.daemon.recv_kind(Kind.REQUEST)
    assert (out.target, out.method, args) == ("other", "double", {"x": 5})
    assert time.monotonic() < out.deadline <= time.monotonic() + 5
    h.daemon.send(Kind.REPLY, 10, out.id)
    header, body = h.daemon.recv_kind(Kind.REPLY)
    assert (header.id, body) == (21, {"other": 10})


def test_ctx_call_error(h: Harness) -> None:
    h.start_ready()
    h.daemon.request(22, "relay_error")
    out, _ = h.daemon.recv_kind(Kind.REQUEST)
    h.daemon.send(Kind.ERROR, Unavailable("no instance of 'other'").to_wire(), out.id)
    header, body = h.daemon.recv_kind(Kind.REPLY)
    assert (header.id, body) == (22, "unavailable")


def test_emit_sends_event(h: Harness) -> None:
    h.start_ready()
    h.daemon.request(23, "announce", {"what": "x"})
    header, body = h.daemon.recv_kind(Kind.EVENT)
    assert (header.method, body) == ("thing.happened", {"what": "x"})
    assert h.daemon.recv_kind(Kind.REPLY)[1] is True


@pytest.mark.parametrize("event", ["sandbox:violation", "plugin:oom", "kernel:shutdown"])
def test_plugin_cannot_emit_the_daemons_own_events(h: Harness, event: str) -> None:
    h.start_ready()
    h.daemon.request(24, "forge", {"event": event})
    header, body = h.daemon.recv()  # the next frame is the error: no EVENT went out first
    assert (header.kind, header.id) == (Kind.ERROR, 24), (header, body)
    assert body["remote_type"] == "ValueError"
    assert f"cannot emit '{event}'" in body["message"]
    h.daemon.request(25, "forge", {"event": "box.fine"})  # any other name goes out
    header, body = h.daemon.recv_kind(Kind.EVENT)
    assert (header.method, body) == ("box.fine", {"message": "forged"})
    header, body = h.daemon.recv_kind(Kind.REPLY)
    assert (header.id, body) == (25, "emitted")


def test_garbage_frames_are_dropped(h: Harness) -> None:
    proc, _ = h.start_ready()
    h.daemon.send_raw(b"garbage")
    h.daemon.send_raw(b"\xc1", b"")
    h.daemon.send_raw(pack([99, 4, 1, "echo", "echo", 0.0, None]), b"")
    h.daemon.send_raw(encode_header(Kind.REQUEST, 5, "echo", "echo"), b"\xc1", b"x")
    header, body = h.daemon.call("echo", {"value": "still here"})
    assert body == "still here"
    assert proc.poll() is None
    # a request whose body is not msgpack is answered with a frame error
    h.daemon.send_raw(encode_header(Kind.REQUEST, 6, "echo", "echo"), b"\xc1")
    header, body = h.daemon.recv_kind(Kind.ERROR)
    assert (header.id, body["code"]) == (6, "bad_frame")


def test_a_batch_of_requests_is_answered_in_batches(h: Harness) -> None:
    h.start_ready()
    deadline = time.monotonic() + 10
    frames = [h.daemon.peer]
    for i in range(50):
        frames += [encode_header(Kind.REQUEST, 200 + i, "echo", "echo", deadline), pack([i])]
    h.daemon.sock.send_multipart(frames)
    before = len(h.daemon.batches)
    got = [h.daemon.recv_kind(Kind.REPLY) for _ in range(50)]
    assert [(header.id, body) for header, body in got] == [(200 + i, i) for i in range(50)]
    assert len(h.daemon.batches) - before < 50  # answers of one pass leave together
    # a bad header drops the rest of its message, and the worker carries on
    h.daemon.send_raw(
        encode_header(Kind.REQUEST, 300, "echo", "echo", deadline),
        pack(["kept"]),
        b"\xc1",
        b"",
        encode_header(Kind.REQUEST, 301, "echo", "echo", deadline),
        pack(["dropped"]),
    )
    assert h.daemon.recv_kind(Kind.REPLY)[0].id == 300
    assert h.daemon.call("echo", ["after"])[1] == "after"


def test_expired_request_gets_no_reply(h: Harness) -> None:
    h.start_ready()
    h.daemon.request(31, "echo", {"value": "late"}, deadline=time.monotonic() - 1)
    h.daemon.request(32, "echo", {"value": "on time"})
    header, body = h.daemon.recv()
    assert (header.kind, header.id, body) == (Kind.REPLY, 32, "on time")


def test_oversized_result_is_an_error(h: Harness) -> None:
    h.start_ready(entry="plug:Big", max_message_size=4096)
    assert h.daemon.call("big", {"n": 10})[1] == "x" * 10
    header, body = h.daemon.call("big", {"n": 10_000})
    assert (header.kind, body["code"]) == (Kind.ERROR, "bad_frame")
    assert "over the limit of 4096" in body["message"]


def test_stop_while_starting(h: Harness) -> None:
    proc = h.start(entry="plug:StuckStart")
    h.daemon.recv_kind(Kind.HELLO)
    h.daemon.send(Kind.HEALTH, id=1)
    _, health = h.daemon.recv_kind(Kind.HEALTH_REPLY)
    assert health == {"status": "unhealthy", "detail": "plugin is still starting"}
    header, body = h.daemon.call("echo")
    assert (header.kind, body["code"]) == (Kind.ERROR, "unavailable")
    h.daemon.send(Kind.STOP)
    assert h.wait(proc) == 0
    assert not (h.tmp_path / "stopped").exists()
