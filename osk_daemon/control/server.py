"""The daemon's end of the control socket: accept, check credentials, dispatch, reply.

Why: operators (``oskctl``) and scripts drive the daemon through one local socket. The
server must stay up whatever a client does, so everything a client can send or fail to
read is handled per connection, logged, and contained there.

How: ``serve_control`` binds an AF_UNIX stream socket (umask 0o177 around ``bind``, then
``chmod 0600``), and runs one task per connection in a task group. A connection task reads
``SO_PEERCRED`` first and answers ``forbidden`` to peers that are not allowed. Then it reads
request lines (``protocol.LineSplitter``), calls ``CommandHandler.handle`` for each, and
writes the reply before reading the next line, so replies come in request order.

A handler may return an ``AsyncIterator``: its items go out as ``{"stream": item}`` lines,
then a final ``{"ok": true, "result": null}``. While a stream runs the connection also
watches its read side: when the client closes (or half-closes) its end, the stream is
cancelled and the iterator closed, so an idle ``logs -f`` does not outlive its client.

Error mapping: ``OskError`` -> its ``code``; malformed lines -> ``bad_request``; anything
else -> ``internal``, logged with its traceback. Cancellation is never swallowed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from osk_daemon.control.peercred import PeerCred, is_allowed, peer_credentials, resolve_group
from osk_daemon.control.protocol import (
    MAX_REQUEST_LINE,
    BadRequest,
    Forbidden,
    LineSplitter,
    LineTooLong,
    decode_request,
    encode_error,
    encode_exception,
    encode_result,
    encode_stream_item,
)
from osk_daemon.errors import ControlError, OskError

log = logging.getLogger("osk.control")

_RECEIVE_SIZE = 65536
_ACCEPT_RETRY_DELAY = 0.1
_CLIENT_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)


class CommandHandler(Protocol):
    """What the daemon plugs into the control server: one method per request.

    Return a JSON-able result, or an ``AsyncIterator`` whose JSON-able items are streamed.
    Raise an ``OskError`` subclass to answer with its ``code`` and message.
    """

    async def handle(self, cmd: str, args: dict[str, Any], peer: PeerCred) -> Any: ...


async def serve_control(
    path: Path,
    handler: CommandHandler,
    *,
    allowed_group: str | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled.

    Creates the parent directory if missing and replaces a stale socket file; reports
    ``task_status.started()`` once clients can connect; removes the socket file on exit.
    ``allowed_group`` (a name or numeric gid) admits that group's members besides root and
    the daemon's own uid. Raises ``ConfigError`` for an unknown group and ``ControlError``
    if the socket cannot be bound (path in use by a live daemon, not a socket, too long).
    """
    allowed_gid = resolve_group(allowed_group) if allowed_group is not None else None
    sock, bound = _bind(path)
    try:
        async with anyio.create_task_group() as tg:
            log.info("control socket listening on %s", path)
            task_status.started()
            while True:
                await anyio.wait_readable(sock)
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # EMFILE and friends: wait, the pressure may pass
                    log.warning("control socket accept failed: %s", exc)
                    await anyio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                tg.start_soon(_serve_connection, conn, handler, allowed_gid)
    finally:
        sock.close()
        _unlink_if_ours(path, bound)


def _bind(path: Path) -> tuple[socket.socket, os.stat_result]:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a temporary name and rename into place once listening: whoever sees
    # the path can connect (no ECONNREFUSED window between bind and listen).
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        staging.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(staging))
        finally:
            os.umask(old_umask)
        staging.chmod(0o600)
        sock.listen(128)
        sock.setblocking(False)
        staging.rename(path)
        bound = path.lstat()
    except OSError as exc:
        sock.close()
        staging.unlink(missing_ok=True)
        raise ControlError(f"cannot bind control socket {path}: {exc}") from exc
    return sock, bound


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; remove it or pick another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.info("removed stale control socket %s", path)
        return
    except BlockingIOError:
        pass  # backlog full: someone is listening
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            raise ControlError(f"cannot check control socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise ControlError(f"another daemon is listening on {path}; stop it first")


def _unlink_if_ours(path: Path, bound: os.stat_result) -> None:
    try:
        now = path.lstat()
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            path.unlink()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("could not remove control socket %s: %s", path, exc)


async def _serve_connection(
    conn: socket.socket, handler: CommandHandler, allowed_gid: int | None
) -> None:
    try:
        peer = peer_credentials(conn)
        conn.setblocking(False)
        # A transport-backed stream: anyio's raw UNIXSocketStream can hit InvalidStateError
        # when a pending receive is cancelled in the same loop pass that the socket turns
        # readable (server shutdown while a client is connected).
        stream = await anyio.abc.SocketStream.from_socket(conn)
    except OSError as exc:
        conn.close()
        log.warning("control connection could not be set up, closing: %s", exc)
        return
    except BaseException:
        conn.close()
        raise
    async with stream:
        if not is_allowed(peer, own_uid=os.geteuid(), allowed_gid=allowed_gid):
            log.warning(
                "control connection refused: pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid
            )
            refusal = Forbidden(
                f"uid {peer.uid} may not use the control socket; "
                "run as root or the daemon's user, or join daemon.control_group"
            )
            await _send(stream, encode_exception(refusal))
            # Closing with the peer's request unread would reset the connection and the
            # peer could lose the reply: half-close, then discard until EOF (bounded).
            with anyio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.send_eof()
                while len(await stream.receive(65536)) > 0:
                    pass
            return
        try:
            await _Connection(stream, handler, peer).run()
        except Exception:
            log.exception("control connection from pid %d failed", peer.pid)


class _Connection:
    def __init__(
        self, stream: anyio.abc.SocketStream, handler: CommandHandler, peer: PeerCred
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.peer = peer
        self.splitter = LineSplitter(MAX_REQUEST_LINE)
        self.lines: deque[bytes] = deque()
        self.closed = False  # the client's read side ended, or its input was unframeable

    async def run(self) -> None:
        while (line := await self._next_line()) is not None:
            if not line.strip():
                continue
            if not await self._answer(line):
                return

    async def _next_line(self) -> bytes | None:
        while not self.lines:
            if self.closed or not await self._receive():
                return None
        return self.lines.popleft()

    async def _receive(self, *, may_reply: bool = True) -> bool:
        """Read one chunk into ``self.lines``; False when input ends.

        ``may_reply=False`` while a stream is being sent: two concurrent sends would
        interleave, so an overlong line then just ends the connection.
        """
        try:
            data = await self.stream.receive(_RECEIVE_SIZE)
        except _CLIENT_GONE:
            if self.splitter.pending:
                log.debug("control client pid %d left a partial line", self.peer.pid)
            self.closed = True
            return False
        try:
            self.lines.extend(self.splitter.feed(data))
        except LineTooLong as exc:
            log.warning("control client pid %d: %s; closing", self.peer.pid, exc)
            self.closed = True
            self.lines.clear()
            if may_reply:
                await _send(self.stream, encode_exception(exc))
            return False
        return True

    async def _answer(self, line: bytes) -> bool:
        """Handle one request line; False when the connection is done."""
        try:
            request = decode_request(line)
        except BadRequest as exc:
            log.info("control client pid %d: %s", self.peer.pid, exc)
            return await _send(self.stream, encode_exception(exc))
        try:
            result = await self.handler.handle(request.cmd, request.args, self.peer)
        except OskError as exc:
            return await _send(self.stream, encode_exception(exc))
        except Exception:
            log.exception("control command %r failed", request.cmd)
            return await _send(self.stream, _internal(request.cmd))
        if isinstance(result, AsyncIterator):
            return await self._stream(request.cmd, result)
        return await _send(self.stream, _encode_or_internal(request.cmd, result))

    async def _stream(self, cmd: str, items: AsyncIterator[Any]) -> bool:
        alive = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_client, tg.cancel_scope)
            try:
                async for item in items:
                    if not await _send(self.stream, encode_stream_item(item)):
                        alive = False
                        break
                else:
                    alive = await _send(self.stream, encode_result(None))
            except OskError as exc:
                alive = await _send(self.stream, encode_exception(exc))
            except Exception:
                log.exception("control stream %r failed", cmd)
                alive = await _send(self.stream, _internal(cmd))
            finally:
                with anyio.CancelScope(shield=True):
                    await _aclose(cmd, items)
            tg.cancel_scope.cancel()
        return alive and not self.closed

    async def _watch_client(self, scope: anyio.CancelScope) -> None:
        while await self._receive(may_reply=False):
            pass
        scope.cancel()


def _internal(cmd: str) -> bytes:
    return encode_error("internal", f"command {cmd!r} failed inside the daemon; see its log")


def _encode_or_internal(cmd: str, value: Any) -> bytes:
    try:
        return encode_result(value)
    except (TypeError, ValueError):
        log.exception("control command %r returned a result that is not JSON-able", cmd)
        return _internal(cmd)


async def _aclose(cmd: str, items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.exception("closing the %r stream failed", cmd)


async def _send(stream: anyio.abc.SocketStream, data: bytes) -> bool:
    """Send one line; False if the client is gone (that is not an error for the server)."""
    try:
        await stream.send(data)
    except _CLIENT_GONE:
        return False
    return True
