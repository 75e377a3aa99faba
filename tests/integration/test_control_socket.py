"""The control server on a real AF_UNIX socket: permissions, replies, streams, bad clients.

``FakeHandler`` answers the real commands with fixed data (the daemon's own handler is
tested elsewhere); ``running_in_thread`` serves it from a background event loop for tests
whose client blocks (forked peers here, ``oskctl`` subprocesses in test_oskctl.py).
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.from_thread import start_blocking_portal

from osk_daemon.control import PeerCred, serve_control
from osk_daemon.control.protocol import MAX_REQUEST_LINE, LineSplitter, encode_request
from osk_daemon.errors import ControlError, RemoteError, Unavailable

pytestmark = [pytest.mark.timeout(30), pytest.mark.integration]

NOBODY = 65534
DEADLINE = 10.0

STATUS_ROWS: list[dict[str, Any]] = [
    {
        "plugin": "echo",
        "instance": 0,
        "version": "1.2.0",
        "pid": 4242,
        "state": "running",
        "health": "ok",
        "restarts": 0,
        "uptime_s": 312.5,
        "last_exit": None,
    },
    {
        "plugin": "indexer",
        "instance": 1,
        "version": "0.3.1",
        "pid": None,
        "state": "backoff",
        "health": None,
        "restarts": 4,
        "uptime_s": None,
        "last_exit": "exit 1",
    },
]
LOG_ITEMS: list[dict[str, Any]] = [
    {
        "ts": 1_700_000_000.5 + i,
        "plugin": "echo",
        "instance": 0,
        "stream": "stdout",
        "line": f"l{i}",
    }
    for i in range(5)
]
EVENTS: list[dict[str, Any]] = [
    {"event": "InstanceStarted", "plugin": "echo", "instance": 0},
    {"event": "InstanceExited", "plugin": "echo", "instance": 0, "code": 1},
]


class FakeHandler:
    """A ``CommandHandler`` with fixed answers; ``stream_closed`` is set when a follow ends."""

    def __init__(self) -> None:
        self.stream_closed = threading.Event()
        self.peers: list[PeerCred] = []

    async def handle(self, cmd: str, args: dict[str, Any], peer: PeerCred) -> Any:
        self.peers.append(peer)
        if cmd == "status":
            plugin = args.get("plugin")
            rows = [r for r in STATUS_ROWS if plugin is None or r["plugin"] == plugin]
            if not rows:
                raise Unavailable(f"no plugin named {plugin!r}")
            return rows
        if cmd in ("start", "stop", "restart"):
            return f"{cmd} {args['name']} instance={args.get('instance')}: ok"
        if cmd == "call":
            return self._call(args)
        if cmd == "logs":
            items = LOG_ITEMS[-int(args.get("lines") or len(LOG_ITEMS)) :]
            return self._follow(items) if args.get("follow") else items
        if cmd == "events":
            return _finite(EVENTS) if args.get("follow") else EVENTS
        if cmd == "broken_stream":
            return _broken()
        if cmd == "shutdown":
            return "shutting down"
        raise ControlError(f"unknown command {cmd!r}")

    def _call(self, args: dict[str, Any]) -> Any:
        method = args.get("method")
        if method == "echo":
            return {"args": args.get("args"), "timeout": args.get("timeout")}
        if method == "hello":
            return "hello"
        if method == "fail":
            raise RemoteError("kaput", "ValueError")
        if method == "crash":
            raise RuntimeError("handler bug")
        if method == "notjson":
            return {"x": object()}
        raise Unavailable(f"no method {method!r}")

    async def _follow(self, items: Sequence[Any]) -> AsyncIterator[Any]:
        try:
            for item in items:
                yield item
            await anyio.sleep_forever()
        finally:
            self.stream_closed.set()


async def _finite(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def _broken() -> AsyncIterator[Any]:
    yield 1
    raise Unavailable("stream source vanished")


@contextmanager
def running_in_thread(path: Path, handler: Any, **kwargs: Any) -> Iterator[None]:
    """Serve ``handler`` at ``path`` on an event loop in a background thread."""
    with start_blocking_portal(backend="asyncio") as portal:
        future, _ = portal.start_task(functools.partial(serve_control, path, handler, **kwargs))
        try:
            yield
        finally:
            future.cancel()


@asynccontextmanager
async def serving(path: Path, handler: Any, **kwargs: Any) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(serve_control, path, handler, **kwargs))
        yield
        tg.cancel_scope.cancel()


class Client:
    """A minimal async client that returns raw reply objects."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.splitter = LineSplitter(64 * MAX_REQUEST_LINE)
        self.lines: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def reply(self) -> Any:
        with anyio.fail_after(DEADLINE):
            while not self.lines:
                self.lines += self.splitter.feed(await self.stream.receive())
        return json.loads(self.lines.pop(0))

    async def request(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        await self.send(encode_request(cmd, args))
        return await self.reply()

    async def at_eof(self) -> bool:
        with anyio.fail_after(DEADLINE):
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        self.lines += self.splitter.feed(data)
        return False


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Client]:
    async with await anyio.connect_unix(path) as stream:
        yield Client(stream)


def error_code(reply: Any) -> str:
    assert reply["ok"] is False, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    return str(reply["error"]["code"])


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory others may traverse (pytest's tmp_path base is 0700, shutting out nobody)."""
    path = Path(tempfile.mkdtemp(prefix="osk-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- socket file ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_socket_is_0600_and_removed_on_exit(sock_path: Path) -> None:
    async with serving(sock_path, FakeHandler()):
        mode = (await anyio.Path(sock_path).stat()).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert not await anyio.Path(sock_path).exists()


@pytest.mark.anyio
async def test_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(os.fspath(sock_path))
    async with serving(sock_path, FakeHandler()), connect(sock_path) as client:
        assert (await client.request("shutdown")) == {"ok": True, "result": "shutting down"}


@pytest.mark.anyio
async def test_live_socket_and_regular_files_are_not_taken_over(sock_path: Path) -> None:
    async with serving(sock_path, FakeHandler()):
        with pytest.raises(ControlError, match="another daemon"):
            await serve_control(sock_path, FakeHandler())
        async with connect(sock_path) as client:
            assert (await client.request("status"))["ok"] is True
    await anyio.Path(sock_path).write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        await serve_control(sock_path, FakeHandler())


# -- requests and replies ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_are_answered_in_order_on_one_connection(sock_path: Path) -> None:
    handler = FakeHandler()
    async with serving(sock_path, handler), connect(sock_path) as client:
        assert await client.request("status", {"plugin": None}) == {
            "ok": True,
            "result": STATUS_ROWS,
        }
        pipelined = b"".join(
            encode_request("status", {"plugin": name}) for name in ("indexer", "echo")
        )
        await client.send(pipelined + b"\n")  # a blank line between requests is ignored
        assert (await client.reply())["result"] == [STATUS_ROWS[1]]
        assert (await client.reply())["result"] == [STATUS_ROWS[0]]
        args = {"plugin": "p", "method": "echo", "args": [1, "é"], "timeout": 2.5}
        assert (await client.request("call", args))["result"] == {
            "args": [1, "é"],
            "timeout": 2.5,
        }
    assert handler.peers[0] == PeerCred(os.getpid(), os.geteuid(), os.getegid())


@pytest.mark.anyio
async def test_streams_end_with_a_final_ok(sock_path: Path) -> None:
    async with serving(sock_path, FakeHandler()), connect(sock_path) as client:
        await client.send(encode_request("events", {"follow": True}))
        assert [await client.reply() for _ in EVENTS] == [{"stream": e} for e in EVENTS]
        assert await client.reply() == {"ok": True, "result": None}
        assert (await client.request("events", {"follow": False}))["result"] == EVENTS


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("cmd", "args", "code"),
    [
        ("status", {"plugin": "nope"}, "unavailable"),
        ("call", {"method": "fail"}, "remote"),
        ("call", {"method": "crash"}, "internal"),
        ("call", {"method": "notjson"}, "internal"),
        ("frobnicate", {}, "control"),
    ],
)
async def test_errors_are_mapped_to_codes(
    sock_path: Path, cmd: str, args: dict[str, Any], code: str
) -> None:
    async with serving(sock_path, FakeHandler()), connect(sock_path) as client:
        assert error_code(await client.request(cmd, args)) == code
        assert (await client.request("shutdown"))["ok"] is True


@pytest.mark.anyio
async def test_an_error_mid_stream_is_the_final_reply(sock_path: Path) -> None:
    async with serving(sock_path, FakeHandler()), connect(sock_path) as client:
        await client.send(encode_request("broken_stream"))
        assert await client.reply() == {"stream": 1}
        assert error_code(await client.reply()) == "unavailable"
        assert (await client.request("shutdown"))["ok"] is True


# -- bad clients ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xfe\x00garbage\n",
        b"not json\n",
        b"[1]\n",
        b'{"args": {}}\n',
        b'{"cmd":"x","args":3}\n',
    ],
)
async def test_garbage_is_answered_and_the_connection_survives(
    sock_path: Path, garbage: bytes
) -> None:
    async with serving(sock_path, FakeHandler()), connect(sock_path) as client:
        await client.send(garbage)
        assert error_code(await client.reply()) == "bad_request"
        assert (await client.request("shutdown"))["ok"] is True


@pytest.mark.anyio
async def test_unterminated_garbage_then_hangup_does_not_hurt(sock_path: Path) -> None:
    async with serving(sock_path, FakeHandler()):
        async with connect(sock_path) as client:
            await client.send(os.urandom(4096).replace(b"\n", b"x"))
        async with connect(sock_path) as client:
            assert (await client.request("shutdown"))["ok"] is True


@pytest.mark.anyio
async def test_an_overlong_line_is_refused_and_closed(sock_path: Path) -> None:
    async with serving(sock_path, FakeHandler()):
        async with connect(sock_path) as client:
            await client.send(b"a" * (MAX_REQUEST_LINE + 1))
            assert error_code(await client.reply()) == "bad_request"
            assert await client.at_eof()
        async with connect(sock_path) as client:
            assert (await client.request("shutdown"))["ok"] is True


@pytest.mark.anyio
async def test_a_client_leaving_mid_stream_ends_the_stream(sock_path: Path) -> None:
    handler = FakeHandler()
    async with serving(sock_path, handler):
        async with connect(sock_path) as client:
            await client.send(encode_request("logs", {"name": "echo", "follow": True}))
            assert await client.reply() == {"stream": LOG_ITEMS[0]}
        closed = await anyio.to_thread.run_sync(handler.stream_closed.wait, DEADLINE)
        assert closed, "the follow stream was not closed after its client left"
        async with connect(sock_path) as client:
            assert (await client.request("status"))["ok"] is True


@pytest.mark.anyio
async def test_many_clients_are_served_concurrently(sock_path: Path) -> None:
    handler = FakeHandler()
    async with serving(sock_path, handler), connect(sock_path) as follower:
        await follower.send(encode_request("logs", {"name": "echo", "follow": True}))
        assert (await follower.reply())["stream"] == LOG_ITEMS[0]
        async with connect(sock_path) as other:  # served while the follow is still open
            assert (await other.request("status"))["ok"] is True


# -- peer credentials -------------------------------------------------------------------------


def _as_nobody(path: Path, groups: Sequence[int] = ()) -> dict[str, Any]:
    """Fork a child that drops to uid/gid nobody, sends ``status`` and reports what happened."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_fd)
            os.setgroups(list(groups))
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_fd, json.dumps(_child_request(path)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        data = b""
        while True:
            ready, _, _ = select.select([read_fd], [], [], DEADLINE)
            assert ready, "the nobody child did not report in time"
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return dict(json.loads(data))


def _child_request(path: Path) -> dict[str, Any]:  # pragma: no cover - runs in the child
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(encode_request("status"))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            return {"exception": type(exc).__name__}
    return {"reply": json.loads(data)}


def test_nobody_cannot_even_connect_to_the_0600_socket(public_dir: Path) -> None:
    path = public_dir / "control.sock"
    with running_in_thread(path, FakeHandler()):
        assert _as_nobody(path) == {"exception": "PermissionError"}


def test_nobody_is_refused_by_peer_credentials_when_the_mode_is_loosened(
    public_dir: Path,
) -> None:
    path = public_dir / "control.sock"
    handler = FakeHandler()
    with running_in_thread(path, handler):
        path.chmod(0o666)
        result = _as_nobody(path)
        assert error_code(result["reply"]) == "forbidden"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # root still may
            sock.settimeout(DEADLINE)
            sock.connect(os.fspath(path))
            sock.sendall(encode_request("shutdown"))
            assert json.loads(sock.recv(65536)) == {"ok": True, "result": "shutting down"}
    assert handler.peers == [PeerCred(os.getpid(), 0, 0)]


@pytest.mark.parametrize(("groups", "allowed_group"), [((), "nogroup"), ((4242,), "4242")])
def test_members_of_the_allowed_group_are_let_in(
    public_dir: Path, groups: tuple[int, ...], allowed_group: str
) -> None:
    path = public_dir / "control.sock"
    handler = FakeHandler()
    with running_in_thread(path, handler, allowed_group=allowed_group):
        path.chmod(0o666)
        assert _as_nobody(path, groups)["reply"] == {"ok": True, "result": STATUS_ROWS}
    assert handler.peers[0].uid == NOBODY
