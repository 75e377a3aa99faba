"""The zygote: a fork-server with the worker runtime pre-imported.

Why: starting Python and importing the worker runtime costs 50-130 ms; ``fork`` of a process
that already did it costs about a millisecond. The zygote pays the imports once and forks a
plugin process per request. It must stay fork-safe: no threads, no ZeroMQ context, no open
files held by preloaded modules. It imports only this module, ``launch`` and its preloads.

How: ``python -P -m osk_daemon.supervisor.zygote [--warm K] [--warm-up MOD:FN]
[--path DIR]... MODULE...`` runs with one end of a ``SOCK_SEQPACKET`` socketpair as fd 3.
It imports each MODULE (a failure is reported and skipped), fills its warm pool (below),
sends ``{"ready": true, "pid", "preloaded", "failed"}`` and then serves requests one at a
time: a msgpack map ``{"id", "target", "spec", "env", "cwd", "sys_path", "launch"}`` with
the child's stdout and stderr attached as SCM_RIGHTS fds.

Warm pool (K > 0, the default path): the zygote keeps K children that were forked as below,
called ``setsid`` and reset their signals, and now wait for a request. Each is
announced to the daemon as ``{"warm": pid}`` with one end of a new ``SOCK_SEQPACKET``
socketpair attached; the child holds the other end. The daemon sends a request (the same
map and fds) straight to a warm child of its choice, so a restart costs one message and no
zygote wake-up. A warm child also holds a socket to the zygote: when it takes its request
(or dies) the zygote sees EOF there and forks a replacement ``REFILL_DELAY`` later (at once
if no warm child is left): forking and warming a child costs a few ms of CPU, which on a
small machine would be taken from the plugin process just handed out, in the middle of its
start. The warm child runs the rest of ``launch.child_main``. On EOF from the daemon (it
closed its end) it exits 0; on EOF from the zygote (the zygote died) it shuts its request
socket, runs a request the daemon had already sent, else exits 0, so the daemon never
sends a request nobody runs (a send after the shutdown fails with EPIPE).

A warm child waits with its interpreter already warm: it has run one asyncio loop pass and,
with ``--warm-up MOD:FN``, called ``FN()`` of that preloaded module, which prepares what any
target of MOD needs before the target is known (the worker runtime: its logging handler,
ZeroMQ context and event loop). The hook must start no thread, run no plugin code and
return ``(fds, release)``: the fds it holds and a function that closes them. A request for
a target in MOD keeps those fds open through ``child_main``; any other target gets
``release()`` first. A ZeroMQ context is safe here only because a warm child never forks
again: it becomes the plugin process itself. A single ``poll`` loop watches the daemon
socket and the warm children's sockets; the zygote stays single-threaded.

Cold path (requests the zygote gets; the daemon sends them when it has no warm child ready):
one fork per request, of a process B that is the *daemon's* child (``sibling.fork_sibling``,
``clone(CLONE_PARENT)``):

    zygote --clone(CLONE_PARENT)--> B (runs launch.child_main: setsid, ..., the target)
    B, once it leads its own session, sends {"id", "pid": B} on its copy of fd 3

The zygote does not wait for B: it forks the next request at once, so a burst of cold
spawns (a boot of hundreds of plugins) is forked back to back. Where the sibling fork is
unavailable (not glibc on x86_64 or arm64) the zygote double-forks: its child A forks B
and exits at once, B's report also carries ``"middle": A``, the zygote reaps A when A's
pidfd says it exited (``_ColdSpawns``), and the daemon takes B as spawned only once A is gone
(``zygote_client``): B is re-parented to the nearest child subreaper, the daemon. Warm
children are forked the same way (``_fork_b``), and their hello is read when it comes
(``_Pool``). Either way the daemon reaps B and reads its exact exit status. Errors come back as
``{"id", "error"}``. EOF on the daemon socket (the daemon closed its end or died) ends the
zygote with status 0, and with it every warm child.
"""

from __future__ import annotations

import gc
import importlib
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import msgpack

from osk_daemon.supervisor.launch import (
    EXIT_BAD_REQUEST,
    MAX_REQUEST_FDS,
    SpawnRequest,
    child_main,
    close_fds_except,
    enter_session,
    request_from_fds,
)
from osk_daemon.supervisor.sibling import fork_sibling, sibling_fork_unavailable

SOCKET_FD = 3
MAX_MESSAGE = 1 << 20
WARM_HELLO_TIMEOUT = 5.0
REFILL_DELAY = 0.02  # s from a hand-out to the refill while another warm child is ready
REFILL_RETRY = 1.0  # s after a failed fork before the pool tries again
_TRUNCATED = socket.MSG_TRUNC | socket.MSG_CTRUNC
# None: B is forked as our sibling; else why the zygote double-forks
SIBLING_FORK_UNAVAILABLE = (
    "OSK_ZYGOTE_DOUBLE_FORK is set"
    if os.environ.get("OSK_ZYGOTE_DOUBLE_FORK")
    else sibling_fork_unavailable()
)


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


class _Args(NamedTuple):
    warm: int
    warm_up: str | None
    paths: list[str]
    modules: list[str]


def _parse_args(argv: list[str]) -> _Args:
    warm = 0
    warm_up: str | None = None
    paths: list[str] = []
    modules: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--path":
            paths.append(next(args))
        elif arg == "--warm":
            warm = max(0, int(next(args)))
        elif arg == "--warm-up":
            warm_up = next(args)
        else:
            modules.append(arg)
    return _Args(warm, warm_up, paths, modules)


_Release = Callable[[], None]
_Hook = Callable[[], tuple[frozenset[int], _Release]]


class _WarmUp(NamedTuple):
    """A warm-up hook and the module whose targets it prepares for."""

    module: str
    hook: _Hook


def _resolve_warm_up(spec: str | None) -> _WarmUp | None:
    """The ``--warm-up MOD:FN`` hook; None (logged) if MOD is not imported or has no FN."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    hook = getattr(sys.modules.get(module), name, None) if name else None
    if not callable(hook):
        _log(f"warm-up {spec!r} ignored: not a function of a preloaded module")
        return None
    return _WarmUp(module, hook)


class _Warm(NamedTuple):
    pid: int
    sock: socket.socket  # the zygote's end of the child's socket: EOF when it is used or dies
    requests: socket.socket  # the daemon's end of its request socket, until announced


def _prefault() -> None:
    """Run and close one throwaway asyncio loop while idle, if a preload imported asyncio.

    A fresh fork pays ~1 ms of copy-on-write faults and lazy set-up the first time it runs
    a loop; a warm child pays it before its request arrives. It starts no thread and leaves
    no fd open, so the target still starts from a clean, unconfined process.
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        asyncio.run(asyncio.sleep(0))


class _Prepared(NamedTuple):
    """What a warm-up hook left in this warm child for the targets of ``module``."""

    module: str
    fds: frozenset[int]
    release: _Release

    def keep_for(self, target: str) -> frozenset[int]:
        """The fds to keep open for ``target``; releases everything if it is not ours."""
        if target.partition(":")[0] == self.module:
            return self.fds
        self.release()  # nothing prepared for another module may leak into this target
        return frozenset()


def _prepare(warm_up: _WarmUp | None) -> _Prepared | None:
    """Warm this child up while it waits; what ``warm_up`` prepared, or None."""
    if warm_up is None:
        _prefault()
        return None
    try:
        fds, release = warm_up.hook()
    except Exception as exc:  # the target then starts the slow way
        _log(f"warm-up of {warm_up.module} failed in warm child {os.getpid()}: {exc!r}")
        return None
    return _Prepared(warm_up.module, frozenset(fds), release)


def _wait_request(zygote: socket.socket, requests: socket.socket) -> tuple[bytes, list[int], int]:
    """Block until the daemon's request comes: ``(data, fds, flags)``; ``b""`` on EOF.

    EOF from the daemon ends the wait. So does EOF from the zygote (it died): the request
    socket is shut first, so a request sent before counts and any later send fails.
    """
    poller = select.poll()
    poller.register(requests.fileno(), select.POLLIN)
    poller.register(zygote.fileno(), select.POLLIN)
    events = {fd for fd, _ in poller.poll()}
    if requests.fileno() not in events:
        requests.shutdown(socket.SHUT_RD)
    data, fds, flags, _ = socket.recv_fds(
        requests, MAX_MESSAGE, MAX_REQUEST_FDS, socket.MSG_DONTWAIT
    )
    return data, fds, flags


def _warm_main(zygote_fd: int, requests_fd: int, warm_up: _WarmUp | None) -> NoReturn:
    """Process B of a warm child: enter its session, warm up, wait for one request, run it."""
    keep: frozenset[int] = frozenset()
    try:
        enter_session()
        close_fds_except(zygote_fd, requests_fd)  # the daemon's and other children's too
        zygote = socket.socket(fileno=zygote_fd)
        requests = socket.socket(fileno=requests_fd)
        _send(zygote, {"pid": os.getpid()})
        prepared = _prepare(warm_up)
        data, fds, flags = _wait_request(zygote, requests)
        if not data:
            os._exit(0)
        if flags & _TRUNCATED:
            raise ValueError("request truncated")
        req = request_from_fds(msgpack.unpackb(data, raw=False), fds)
        zygote.detach()  # child_main closes both with every other fd
        requests.detach()
        if prepared is not None:
            keep = prepared.keep_for(req.target)
    except BaseException as exc:
        try:
            _log(f"warm child {os.getpid()} failed before its target: {exc}")
        finally:
            os._exit(EXIT_BAD_REQUEST)
    child_main(req, in_session=True, keep_fds=keep)


class _Hatching(NamedTuple):
    """A warm child forked but not yet heard from (its ``{"pid"}`` hello)."""

    sock: socket.socket  # the zygote's end of the child's socket
    requests: socket.socket  # the daemon's end of its request socket
    middle: int | None  # the pid of A, which exits as soon as it forked B (None: no A)
    deadline: float  # monotonic: given up on after WARM_HELLO_TIMEOUT


class _Pool:
    """Up to ``size`` warm children announced to the daemon and not used yet.

    A refill never blocks the zygote: ``fill`` forks and returns; the child's hello arrives
    on its socket, which ``serve`` polls with the others (``event``), and only then is it
    announced. Until then it counts towards ``size`` (``hatching``), so it is forked once.
    """

    def __init__(self, daemon: socket.socket, size: int, warm_up: _WarmUp | None) -> None:
        self.daemon = daemon
        self.size = size
        self.warm_up = warm_up
        self.ready: dict[int, _Warm] = {}  # by the zygote's socket fd
        self.hatching: dict[int, _Hatching] = {}  # by the zygote's socket fd
        self.refill_at: float | None = None  # monotonic; None: at once when short

    def settle(self) -> None:
        """Wait until every warm child forked so far said hello or was given up on (the
        first fill, before the zygote says it is ready: the pool is full from the start)."""
        while self.hatching:
            poller = select.poll()
            for fd in self.hatching:
                poller.register(fd, select.POLLIN)
            due = min(child.deadline for child in self.hatching.values())
            for fd, _ in poller.poll(max(0.0, (due - time.monotonic()) * 1000)):
                self.event(fd)
            self.expire()

    def watched(self) -> set[int]:
        """The fds ``serve`` polls for the pool: every warm child's socket to us."""
        return self.ready.keys() | self.hatching.keys()

    def fill(self) -> None:
        """Fork warm children until there are ``size``; after a failure, retry later."""
        self.refill_at = None
        while self._short():
            child = self._fork()
            if child is None:
                self.refill_at = time.monotonic() + REFILL_RETRY
                return
            self.hatching[child.sock.fileno()] = child

    def event(self, fd: int) -> None:
        """A warm child's socket had an event: its hello, or it took a request or died."""
        if fd in self.hatching:
            self._hatched(self.hatching.pop(fd))
            return
        child = self.ready.pop(fd, None)
        if child is not None:
            child.sock.close()
            self._refill_by(REFILL_DELAY if self.ready else 0.0)

    def expire(self) -> None:
        """Give up on warm children that did not say hello in time (and retry later)."""
        now = time.monotonic()
        for fd, child in list(self.hatching.items()):
            if now >= child.deadline:
                del self.hatching[fd]
                if child.middle is not None:
                    os.waitpid(child.middle, 0)
                self._discard(child, "did not start within WARM_HELLO_TIMEOUT")

    def fill_due(self) -> bool:
        """Short of ``size`` and past any retry delay: ``fill`` should run now."""
        return self._short() and (self.refill_at is None or time.monotonic() >= self.refill_at)

    def wait_ms(self) -> float | None:
        """How long ``serve`` may wait before ``fill`` or ``expire`` is due (None: forever)."""
        due = [child.deadline for child in self.hatching.values()]
        if self._short():
            due.append(time.monotonic() if self.refill_at is None else self.refill_at)
        if not due:
            return None
        return max(0.0, (min(due) - time.monotonic()) * 1000)

    def _short(self) -> bool:
        """Fewer than ``size`` warm children, counting those still hatching."""
        return len(self.ready) + len(self.hatching) < self.size

    def _hatched(self, child: _Hatching) -> None:
        # A (if any) reaped first (at most a moment's wait: A exits right after its fork),
        # so B is the daemon's child before the daemon hears of it
        if child.middle is not None:
            os.waitpid(child.middle, 0)
        try:
            hello = msgpack.unpackb(child.sock.recv(256, socket.MSG_DONTWAIT), raw=False)
            warm = _Warm(int(hello["pid"]), child.sock, child.requests)
        except Exception as exc:
            self._discard(child, repr(exc))
            return
        try:
            message = msgpack.packb({"warm": warm.pid}, use_bin_type=True)
            socket.send_fds(self.daemon, [message], [warm.requests.fileno()])
        except OSError as exc:  # the daemon is gone: so is this child, at our socket's EOF
            warm.sock.close()
            _log(f"could not announce warm child {warm.pid}: {exc}")
            return
        finally:
            warm.requests.close()  # the daemon has its own copy now (or none is needed)
        self.ready[warm.sock.fileno()] = warm

    def _discard(self, child: _Hatching, why: str) -> None:
        child.sock.close()  # its EOF ends the child, if it lives
        child.requests.close()
        self._refill_by(REFILL_RETRY)
        _log(f"warm child did not start: {why}")

    def _refill_by(self, delay: float) -> None:
        due = time.monotonic() + delay
        self.refill_at = due if self.refill_at is None else min(self.refill_at, due)

    def _fork(self) -> _Hatching | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemons, childs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            middle = _fork_b(lambda _: _warm_main(theirs.detach(), childs.detach(), self.warm_up))
        except OSError as exc:
            for sock in (ours, theirs, daemons, childs):
                sock.close()
            _log(f"fork of a warm child failed: {exc}")
            return None
        theirs.close()
        childs.close()
        return _Hatching(ours, daemons, middle, time.monotonic() + WARM_HELLO_TIMEOUT)


def _fork_b(
    b_main: Callable[[int | None], NoReturn],
    middle_failed: Callable[[OSError], None] | None = None,
) -> int | None:
    """Fork process B, which runs ``b_main(middle)`` as the daemon's child; the pid of a
    middle process A to reap (also given to ``b_main``), or None.

    With ``fork_sibling`` (``clone(CLONE_PARENT)``) B is the daemon's child from the start.
    Where that is unavailable (``SIBLING_FORK_UNAVAILABLE``), A forks B and exits at once,
    and B is re-parented to the daemon, a child subreaper; if A cannot fork, A calls
    ``middle_failed`` with the error before it exits. Raises ``OSError`` if the first fork
    fails.
    """
    if SIBLING_FORK_UNAVAILABLE is None:
        if fork_sibling() == 0:
            _run_b(b_main, None)
        return None
    pid = os.fork()
    if pid == 0:  # A
        try:
            middle = os.getpid()
            if os.fork() == 0:
                _run_b(b_main, middle)
        except OSError as exc:
            if middle_failed is not None:
                middle_failed(exc)
        finally:
            os._exit(0)
    return pid


def _run_b(b_main: Callable[[int | None], NoReturn], middle: int | None) -> NoReturn:
    try:
        b_main(middle)
    finally:
        os._exit(EXIT_BAD_REQUEST)


def _reporter(sock: socket.socket, req_id: int, middle: int | None) -> Callable[[], None]:
    """What a cold spawn's B calls once it leads its own session: it reports its pid to the
    daemon itself, on its copy of the zygote's socket (so a zygote that died since the fork
    does not lose the report; the daemon keeps a dead zygote's socket open until every B
    has closed its copy). Behind a middle process A, A's pid goes with it: the daemon
    watches B only once A is gone (``zygote_client``)."""

    def report() -> None:
        reply: dict[str, Any] = {"id": req_id, "pid": os.getpid()}
        if middle is not None:
            reply["middle"] = middle
        try:
            _send(sock, reply)
        finally:
            sock.detach()  # child_main closes fd 3; the object must not close a reused fd

    return report


class _ColdSpawns:
    """Cold spawns: B forked at once, and the middle processes A (only where the sibling
    fork is unavailable) reaped when their pidfd says they exited.

    The zygote waits for neither: it forks the next request meanwhile, so a burst of cold
    spawns is forked back to back while earlier ones start on the other core.
    """

    def __init__(self, daemon: socket.socket) -> None:
        self.daemon = daemon
        self.middles: dict[int, int] = {}  # pidfd -> pid of A

    def start(self, req_id: int, req: SpawnRequest) -> None:
        sock = self.daemon
        try:
            middle = _fork_b(
                lambda a: child_main(req, on_session=_reporter(sock, req_id, a)),
                lambda exc: _send(
                    sock, {"id": req_id, "error": f"fork of the plugin process failed: {exc}"}
                ),
            )
        except OSError as exc:
            _send(self.daemon, {"id": req_id, "error": f"zygote fork failed: {exc}"})
            return
        if middle is None:
            return
        try:
            self.middles[os.pidfd_open(middle)] = middle
        except OSError:  # no pidfd (fds exhausted): wait for A the old way
            os.waitpid(middle, 0)

    def middle_exited(self, pidfd: int) -> None:
        os.waitpid(self.middles.pop(pidfd), 0)
        os.close(pidfd)


def _handle(cold: _ColdSpawns, data: bytes, fds: list[int], flags: int) -> None:
    sock = cold.daemon
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        _log(f"undecodable request dropped: {exc}")
        return
    req_id = msg.get("id") if isinstance(msg, dict) else None
    if not isinstance(req_id, int):
        _log("request without an integer id dropped")
        return
    if flags & _TRUNCATED:
        _send(sock, {"id": req_id, "error": "request truncated"})
        return
    try:
        req = request_from_fds(msg, fds)
    except ValueError as exc:
        _send(sock, {"id": req_id, "error": f"malformed spawn request: {exc}"})
        return
    sys.stdout.flush()
    sys.stderr.flush()
    cold.start(req_id, req)


def serve(sock: socket.socket, pool: _Pool) -> None:
    """Answer spawn requests on ``sock`` until EOF, keeping ``pool`` full."""
    cold = _ColdSpawns(sock)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    polled: set[int] = set()
    while True:
        watched = pool.watched() | cold.middles.keys()
        for fd in polled - watched:
            poller.unregister(fd)
        for fd in watched - polled:
            poller.register(fd, select.POLLIN)
        polled = watched
        events = poller.poll(pool.wait_ms())
        for fd, _ in events:
            if fd in cold.middles:
                cold.middle_exited(fd)
            elif fd != sock.fileno():
                pool.event(fd)
        if any(fd == sock.fileno() for fd, _ in events):
            data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_REQUEST_FDS)
            try:
                if not data and not fds:
                    # EOF: the daemon keeps reading until we exit, so the warm children
                    # still hatching are announced and it waits for them too; else they
                    # would outlive us unheard of, for as long as they take to notice
                    pool.settle()
                    return
                _handle(cold, data, fds, flags)
            finally:
                for fd in fds:
                    os.close(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pool.expire()
        if pool.fill_due():
            pool.fill()


# The zygote and its warm children fork and warm up at this nice value, so refilling the
# pool never takes CPU from plugins that serve; the daemon gives each plugin its normal
# priority as it spawns (see ``Supervisor.feed``).
ZYGOTE_NICE = 10


def main(argv: list[str]) -> int:
    os.nice(ZYGOTE_NICE)
    sock = socket.socket(fileno=SOCKET_FD)
    os.set_inheritable(SOCKET_FD, False)
    args = _parse_args(argv)
    loaded, failed = _preload(args.paths, args.modules)
    warm_up = _resolve_warm_up(args.warm_up)
    gc.collect()
    gc.freeze()  # keep preloaded objects out of later collections: fewer copy-on-write pages
    pool = _Pool(sock, args.warm, warm_up)
    pool.fill()
    pool.settle()
    hello = {"ready": True, "pid": os.getpid(), "preloaded": loaded, "failed": failed}
    _send(sock, {**hello, "double_fork": SIBLING_FORK_UNAVAILABLE})
    try:
        serve(sock, pool)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
