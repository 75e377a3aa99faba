"""The zygote: a fork-server with the worker runtime pre-imported.

Why: starting Python and importing the worker runtime costs 50-130 ms; ``fork`` of a process
that already did it costs about a millisecond. The zygote pays the imports once and forks a
plugin process per request. It must stay fork-safe: no threads, no ZeroMQ context, no open
files held by preloaded modules. It imports only this module, ``launch`` and its preloads.

How: ``python -P -m osk_daemon.supervisor.zygote [--warm K] [--path DIR]... MODULE...`` runs
with one end of a ``SOCK_SEQPACKET`` socketpair as fd 3. It imports each MODULE (a failure
is reported and skipped), fills its warm pool (below), sends ``{"ready": true, "pid",
"preloaded", "failed"}`` and then serves requests one at a time: a msgpack map ``{"id",
"target", "spec", "env", "cwd", "sys_path", "launch"}`` with the child's stdout and stderr
attached as SCM_RIGHTS fds.

Warm pool (K > 0, the default path): the zygote keeps K children that already did the double
fork below, called ``setsid`` and reset their signals, and now block reading their own
socketpair to the zygote. A request is forwarded as it came (bytes and both fds) to one of
them, the daemon gets ``{"id", "pid", "warm": true}`` at once, and only then does the zygote
fork a replacement. The warm child runs the rest of ``launch.child_main``. Each warm child
is announced to the daemon as ``{"warm": pid}`` when it is ready, so the daemon can tell
them from plugins and wait for them on close. A warm child exits 0 on EOF of its socket (the
zygote died or dropped it); any event on an idle warm child's socket means it died, and it
is replaced, never handed a request. A single ``poll`` loop watches the daemon socket and
the warm sockets; the zygote stays single-threaded.

Cold path (K = 0, or no warm child is ready): double-fork per request:

    zygote --fork--> A --fork--> B (runs launch.child_main: setsid, ..., the target)
                     A waits until B has called setsid, sends {"id", "pid": B}, exits 0
    zygote waitpid(A)

Either way, when A exits, B is re-parented to the nearest child subreaper, which is the
daemon, so the daemon reaps B and reads its exact exit status. Errors come back as
``{"id", "error"}``. EOF on the daemon socket (the daemon closed its end or died) ends the
zygote with status 0, and with it every warm child.
"""

from __future__ import annotations

import errno
import gc
import importlib
import os
import select
import socket
import sys
from typing import Any, NamedTuple, NoReturn

import msgpack

from osk_daemon.supervisor.launch import (
    EXIT_BAD_REQUEST,
    child_main,
    close_fds_except,
    enter_session,
    request_from_wire,
)

SOCKET_FD = 3
MAX_MESSAGE = 1 << 20
WARM_HELLO_TIMEOUT = 5.0
_TRUNCATED = socket.MSG_TRUNC | socket.MSG_CTRUNC
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(msgpack.packb(message, use_bin_type=True))


def _log(message: str) -> None:
    print(f"osk zygote: {message}", file=sys.stderr, flush=True)


def _preload(paths: list[str], modules: list[str]) -> tuple[list[str], dict[str, str]]:
    sys.path[:0] = paths
    loaded: list[str] = []
    failed: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"osk zygote: preload of {name!r} failed, skipped: {exc}", file=sys.stderr)
        else:
            loaded.append(name)
    sys.stderr.flush()
    return loaded, failed


def _parse_args(argv: list[str]) -> tuple[int, list[str], list[str]]:
    warm = 0
    paths: list[str] = []
    modules: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--path":
            paths.append(next(args))
        elif arg == "--warm":
            warm = max(0, int(next(args)))
        else:
            modules.append(arg)
    return warm, paths, modules


class _Warm(NamedTuple):
    pid: int
    sock: socket.socket  # the zygote's end


def _prefault() -> None:
    """Run and close one throwaway asyncio loop while idle, if a preload imported asyncio.

    A fresh fork pays ~1 ms of copy-on-write faults and lazy set-up the first time it runs
    a loop; a warm child pays it before its request arrives. It starts no thread and leaves
    no fd open, so the target still starts from a clean, unconfined process.
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        asyncio.run(asyncio.sleep(0))


def _warm_main(fd: int) -> NoReturn:
    """Process B of a warm child: enter its session, wait for one request, run it."""
    try:
        enter_session()
        close_fds_except(fd)  # the daemon socket and other warm children's sockets too
        sock = socket.socket(fileno=fd)
        _send(sock, {"pid": os.getpid()})
        _prefault()
        data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
        if not data:
            os._exit(0)
        if flags & _TRUNCATED or len(fds) != 2:
            raise ValueError("request truncated or without its two fds")
        req = request_from_wire(msgpack.unpackb(data, raw=False), stdout=fds[0], stderr=fds[1])
        sock.detach()  # child_main closes it with every other fd
    except BaseException as exc:
        try:
            _log(f"warm child {os.getpid()} failed before its target: {exc}")
        finally:
            os._exit(EXIT_BAD_REQUEST)
    child_main(req, in_session=True)


class _Pool:
    """Up to ``size`` warm children, ready to be handed a request, in fork order."""

    def __init__(self, daemon: socket.socket, size: int) -> None:
        self.daemon = daemon
        self.size = size
        self.ready: dict[int, _Warm] = {}  # by the zygote's socket fd

    def fill(self) -> None:
        """Fork warm children until there are ``size``; stops at the first failure."""
        while len(self.ready) < self.size:
            child = self._fork()
            if child is None:
                return
            self.ready[child.sock.fileno()] = child
            _send(self.daemon, {"warm": child.pid})

    def take(self) -> _Warm | None:
        if not self.ready:
            return None
        return self.ready.pop(next(iter(self.ready)))

    def drop(self, fd: int) -> None:
        """Forget a warm child whose socket had an event: it died (or misbehaved)."""
        child = self.ready.pop(fd, None)
        if child is not None:
            child.sock.close()  # if it still lives, it exits on this EOF

    def _fork(self) -> _Warm | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            _log(f"fork of a warm child failed: {exc}")
            return None
        if pid == 0:  # A: fork B and exit, so B is re-parented to the daemon
            try:
                if os.fork() == 0:
                    _warm_main(theirs.detach())
            finally:
                os._exit(0)
        theirs.close()
        os.waitpid(pid, 0)
        try:
            ours.settimeout(WARM_HELLO_TIMEOUT)
            hello = msgpack.unpackb(ours.recv(256), raw=False)
            ours.settimeout(None)
            return _Warm(int(hello["pid"]), ours)
        except Exception as exc:
            ours.close()
            _log(f"warm child did not start: {exc!r}")
            return None


def _middle(sock: socket.socket, req_id: int, msg: dict[str, Any], fds: list[int]) -> NoReturn:
    """Process A: fork B, wait until B leads its own session, report B's pid, exit."""
    try:
        req = request_from_wire(msg, stdout=fds[0], stderr=fds[1])
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            sock.detach()  # B closes fd 3 itself; the object must not close a reused fd
            child_main(req, started_fd=ready_w)
        os.close(ready_w)
        os.read(ready_r, 1)  # b"\0" after B's setsid, or b"" if B died first
        _send(sock, {"id": req_id, "pid": pid})
    except BaseException as exc:
        try:
            _send(sock, {"id": req_id, "error": f"fork of the plugin process failed: {exc}"})
        except BaseException:
            pass
    finally:
        os._exit(0)


def _hand_to_warm(
    sock: socket.socket, pool: _Pool, req_id: int, data: bytes, fds: list[int]
) -> bool:
    """Forward the request to a warm child and report its pid; False if none took it."""
    while (child := pool.take()) is not None:
        try:
            socket.send_fds(child.sock, [data], fds)
        except OSError as exc:
            child.sock.close()
            if exc.errno in _PEER_GONE:
                continue  # it died since the last poll: never handed a request
            _log(f"could not hand a request to warm child {child.pid}: {exc}")
            return False
        child.sock.close()
        _send(sock, {"id": req_id, "pid": child.pid, "warm": True})
        return True
    return False


def _handle(sock: socket.socket, pool: _Pool, data: bytes, fds: list[int], flags: int) -> None:
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        _log(f"undecodable request dropped: {exc}")
        return
    req_id = msg.get("id") if isinstance(msg, dict) else None
    if not isinstance(req_id, int):
        _log("request without an integer id dropped")
        return
    if flags & _TRUNCATED or len(fds) != 2:
        _send(sock, {"id": req_id, "error": "request truncated or without its two fds"})
        return
    try:
        request_from_wire(msg, stdout=fds[0], stderr=fds[1])
    except ValueError as exc:
        _send(sock, {"id": req_id, "error": f"malformed spawn request: {exc}"})
        return
    if _hand_to_warm(sock, pool, req_id, data, fds):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        _send(sock, {"id": req_id, "error": f"zygote fork failed: {exc}"})
        return
    if pid == 0:
        _middle(sock, req_id, msg, fds)
    os.waitpid(pid, 0)


def serve(sock: socket.socket, pool: _Pool) -> None:
    """Answer spawn requests on ``sock`` until EOF, keeping ``pool`` full."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    polled: set[int] = set()
    while True:
        for fd in polled - pool.ready.keys():
            poller.unregister(fd)
        for fd in pool.ready.keys() - polled:
            poller.register(fd, select.POLLIN)
        polled = set(pool.ready)
        events = poller.poll()
        for fd, _ in events:
            if fd != sock.fileno():
                pool.drop(fd)  # before any request of this round can be handed to it
        if any(fd == sock.fileno() for fd, _ in events):
            data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
            try:
                if not data and not fds:
                    return
                _handle(sock, pool, data, fds, flags)
            finally:
                for fd in fds:
                    os.close(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pool.fill()


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=SOCKET_FD)
    os.set_inheritable(SOCKET_FD, False)
    warm, paths, modules = _parse_args(argv)
    loaded, failed = _preload(paths, modules)
    gc.collect()
    gc.freeze()  # keep preloaded objects out of later collections: fewer copy-on-write pages
    pool = _Pool(sock, warm)
    pool.fill()
    _send(sock, {"ready": True, "pid": os.getpid(), "preloaded": loaded, "failed": failed})
    try:
        serve(sock, pool)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
