"""The zygote: a fork-server with the worker runtime pre-imported.

Why: starting Python and importing the worker runtime costs 50-130 ms; ``fork`` of a process
that already did it costs about a millisecond. The zygote pays the imports once and forks a
plugin process per request. It must stay fork-safe: no threads, no ZeroMQ context, no open
files held by preloaded modules. It imports only this module, ``launch`` and its preloads.

How: ``python -P -m osk_daemon.supervisor.zygote [--path DIR]... MODULE...`` runs with one
end of a ``SOCK_SEQPACKET`` socketpair as fd 3. It imports each MODULE (a failure is
reported and skipped), sends ``{"ready": true, "pid", "preloaded", "failed"}`` and then
serves requests one at a time: a msgpack map ``{"id", "target", "spec", "env", "cwd",
"sys_path"}`` with the child's stdout and stderr attached as SCM_RIGHTS fds. For each it
double-forks:

    zygote --fork--> A --fork--> B (runs launch.child_main: setsid, ..., the target)
                     A waits until B has called setsid, sends {"id", "pid": B}, exits 0
    zygote waitpid(A)

When A exits, B is re-parented to the nearest child subreaper, which is the daemon, so the
daemon reaps B and reads its exact exit status. Errors come back as ``{"id", "error"}``.
EOF on the socket (the daemon closed its end or died) ends the zygote with status 0.
"""

from __future__ import annotations

import gc
import importlib
import os
import socket
import sys
from typing import Any, NoReturn

import msgpack

from osk_daemon.supervisor.launch import child_main, request_from_wire

SOCKET_FD = 3
MAX_MESSAGE = 1 << 20
_TRUNCATED = socket.MSG_TRUNC | socket.MSG_CTRUNC


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(msgpack.packb(message, use_bin_type=True))


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


def _parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    paths: list[str] = []
    modules: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--path":
            paths.append(next(args))
        else:
            modules.append(arg)
    return paths, modules


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


def _handle(sock: socket.socket, data: bytes, fds: list[int], flags: int) -> None:
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        print(f"osk zygote: undecodable request dropped: {exc}", file=sys.stderr, flush=True)
        return
    req_id = msg.get("id") if isinstance(msg, dict) else None
    if not isinstance(req_id, int):
        print("osk zygote: request without an integer id dropped", file=sys.stderr, flush=True)
        return
    if flags & _TRUNCATED or len(fds) != 2:
        _send(sock, {"id": req_id, "error": "request truncated or without its two fds"})
        return
    try:
        request_from_wire(msg, stdout=fds[0], stderr=fds[1])
    except ValueError as exc:
        _send(sock, {"id": req_id, "error": f"malformed spawn request: {exc}"})
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


def serve(sock: socket.socket) -> None:
    """Answer spawn requests on ``sock`` until EOF."""
    while True:
        data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
        try:
            if not data and not fds:
                return
            _handle(sock, data, fds, flags)
        finally:
            for fd in fds:
                os.close(fd)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=SOCKET_FD)
    os.set_inheritable(SOCKET_FD, False)
    paths, modules = _parse_args(argv)
    loaded, failed = _preload(paths, modules)
    gc.collect()
    gc.freeze()  # keep preloaded objects out of later collections: fewer copy-on-write pages
    _send(sock, {"ready": True, "pid": os.getpid(), "preloaded": loaded, "failed": failed})
    try:
        serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
