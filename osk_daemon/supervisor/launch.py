"""What happens inside a new plugin process, and the exec launcher's main.

Why: a plugin process starts one of two ways — forked by the zygote (fast) or exec'd as
``python -P -m osk_daemon.supervisor.launch`` (a fresh interpreter; the fallback). Both must
leave the child in the same state before plugin code runs, so both end in ``child_main``.
Later, confinement is inserted there in the architecture's order (cgroup, namespaces,
rlimits, privilege drop, parent-death signal, no_new_privs, Landlock, seccomp).

How (``child_main``, in this order): ``setsid()`` so the child leads its own session and
process group (the supervisor signals the whole group); signal dispositions that the daemon
or zygote changed go back to the default and the signal mask is emptied (these two steps are
``enter_session``: a warm zygote child does them before it waits for its request); stdin becomes
``/dev/null`` and the request's fds become 1 and 2; every other fd is closed; environment,
cwd and ``sys.path`` are applied; the ``module:function`` target is imported and called
with the spec. Returning exits 0, ``sys.exit(n)`` exits n, any other exception prints its
traceback to stderr and exits 70 (``EXIT_TARGET_RAISED``). The exit is always ``os._exit``
after flushing stdout/stderr: no atexit handlers or finalizers inherited from the zygote.

This module must stay cheap to import and thread-free: the zygote imports it.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack

__all__ = [
    "EXIT_TARGET_RAISED",
    "REQUEST_ENV",
    "SpawnRequest",
    "child_main",
    "close_fds_except",
    "enter_session",
    "request_from_wire",
    "request_to_wire",
]

EXIT_TARGET_RAISED = 70
EXIT_BAD_REQUEST = 64
REQUEST_ENV = "OSK_SPAWN_REQUEST"
EXEC_BEAT_FD = 3  # where the exec path puts the beat page's fd
EXEC_GO_FD = 4  # and a standby's go socket
MAX_REQUEST_FDS = 4  # stdout, stderr, beat page, go socket
RESET_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGPIPE,
)


@dataclass(frozen=True)
class SpawnRequest:
    """One process to start.

    ``target`` is ``"module:function"``, called as ``function(spec)`` in the child.
    ``env`` is the child's whole environment (``None`` or empty: the daemon's
    ``os.environ`` at spawn time; the spawners resolve that before sending). ``sys_path``
    entries are prepended to ``sys.path`` before the target is imported.
    ``stdout``/``stderr`` are fds *in the spawning process* that become the child's 1 and 2;
    the caller keeps ownership of them. stdin is ``/dev/null``. ``beat``, if given, is an fd
    (also the caller's) of the life's heartbeat page (``ipc.beats``): it stays open in the
    child, which finds its number as ``spec["beat_fd"]``. ``go``, if given, makes the child
    a standby (``worker.runtime``): its end of a socket pair (the caller's fd) on which the
    daemon promotes it; the child finds its number as ``spec["go_fd"]``.
    """

    target: str
    spec: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] | None = None
    cwd: str | None = None
    sys_path: tuple[str, ...] = ()
    stdout: int = 1
    stderr: int = 2
    launch: dict[str, Any] | None = None  # an isolation LaunchPlan in wire form
    beat: int | None = None
    go: int | None = None


def request_to_wire(req: SpawnRequest, *, env: Mapping[str, str] | None) -> dict[str, Any]:
    """The msgpack-able form of ``req`` without its fds; ``env`` is sent as given."""
    return {
        "target": req.target,
        "spec": req.spec,
        "env": None if env is None else dict(env),
        "cwd": req.cwd,
        "sys_path": list(req.sys_path),
        "launch": req.launch,
        # which fds follow stdout and stderr: the exec path finds them as fds 3 and 4,
        # the zygote's children get them attached in this order
        "beat": req.beat is not None,
        "go": req.go is not None,
    }


def request_from_wire(
    data: Any, *, stdout: int, stderr: int, beat: int | None = None, go: int | None = None
) -> SpawnRequest:
    """Rebuild a request from ``request_to_wire`` output; raises ``ValueError`` if malformed."""
    if not isinstance(data, dict):
        raise ValueError(f"spawn request must be a map, got {type(data).__name__}")
    target, spec, env = data.get("target"), data.get("spec"), data.get("env")
    cwd, sys_path = data.get("cwd"), data.get("sys_path", [])
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"spawn target must be 'module:function', got {target!r:.100}")
    if not isinstance(spec, dict):
        raise ValueError("spawn spec must be a map")
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise ValueError("spawn env must map str to str")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError("spawn cwd must be a string")
    if not isinstance(sys_path, list) or not all(isinstance(p, str) for p in sys_path):
        raise ValueError("spawn sys_path must be a list of strings")
    launch = data.get("launch")
    if launch is not None and not isinstance(launch, dict):
        raise ValueError("spawn launch plan must be a map")
    return SpawnRequest(target, spec, env, cwd, tuple(sys_path), stdout, stderr, launch, beat, go)


def request_from_fds(data: Any, fds: Sequence[int]) -> SpawnRequest:
    """``request_from_wire`` for a request that came with its fds attached (stdout,
    stderr, then the beat page and the go socket if its flags say so), as the zygote and its
    warm children get them; raises ``ValueError`` if malformed or the fds do not match."""
    flags = (data.get("beat"), data.get("go")) if isinstance(data, dict) else (None, None)
    wanted = 2 + sum(1 for flag in flags if flag)
    if len(fds) != wanted:
        raise ValueError(f"this spawn request comes with {wanted} fds, got {len(fds)}")
    extra = iter(fds[2:])
    beat = next(extra) if flags[0] else None
    go = next(extra) if flags[1] else None
    return request_from_wire(data, stdout=fds[0], stderr=fds[1], beat=beat, go=go)


def request_fds(req: SpawnRequest) -> list[int]:
    """The fds to attach to ``req`` for ``request_from_fds`` at the other end."""
    return [req.stdout, req.stderr, *(fd for fd in (req.beat, req.go) if fd is not None)]


def encode_env_request(req: SpawnRequest) -> str:
    """The ``OSK_SPAWN_REQUEST`` value for the exec path (env travels as the real env)."""
    packed = msgpack.packb(request_to_wire(req, env=None), use_bin_type=True)
    return base64.b64encode(packed).decode("ascii")


def _setsid() -> None:
    try:
        os.setsid()
    except PermissionError:
        # Already a process-group leader: fine only if it already leads its session
        # (posix_spawn(setsid=True) on the exec path did it before exec).
        if os.getsid(0) != os.getpid():
            raise


def _max_fd() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = [n for n in (soft, hard, os.sysconf("SC_OPEN_MAX")) if n > 0]
    return max([*limits, 1024])


def close_fds_except(*keep: int) -> None:
    """Close every fd from 3 up except ``keep`` (one ``close_range`` call per gap on Linux)."""
    low = 3
    for fd in sorted(fd for fd in set(keep) if fd >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _max_fd())


def _setup_fds(stdout: int, stderr: int, keep: frozenset[int]) -> None:
    if stderr == 1:  # about to be overwritten by the stdout dup2
        stderr = os.dup(stderr)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != 0:
        os.dup2(devnull, 0)
        os.close(devnull)
    for fd in (0, 1, 2):
        os.set_inheritable(fd, True)
    # close_range(2) on Linux >= 5.9: one syscall per gap however high the limit.
    close_fds_except(*keep)


def _replace_environ(env: Mapping[str, str]) -> None:
    """Make ``os.environ`` exactly ``env``, touching only what differs (a zygote child
    usually inherits almost the same environment; clear-and-refill cost ~0.4 ms)."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _resolve(target: str) -> Any:
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def enter_session(on_session: Callable[[], None] | None = None) -> None:
    """The first steps of ``child_main``: ``setsid``, default signals, an empty signal mask.

    ``on_session`` is called right after ``setsid``, and also if ``setsid`` failed: the
    zygote's cold spawns report their pid to the daemon there, so the pid the daemon
    learns already leads its own process group (and a process that could not start is
    still heard of). Raises ``OSError`` if ``setsid`` fails.
    """
    try:
        _setsid()
    finally:
        if on_session is not None:
            on_session()
    for signum in RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def child_main(
    req: SpawnRequest,
    *,
    on_session: Callable[[], None] | None = None,
    in_session: bool = False,
    keep_fds: frozenset[int] = frozenset(),
) -> NoReturn:
    """Turn the current (fresh) process into the plugin process and run the target.

    ``req.stdout``/``req.stderr`` are fds of *this* process. ``on_session`` is passed to
    ``enter_session``; ``in_session=True`` skips that step (a warm zygote child did it
    before it received ``req``). ``keep_fds`` stay open with 0-2 (what a warm-up hook
    prepared for this target); every other fd is closed. Never returns: exits 0, the
    ``sys.exit`` code, or ``EXIT_TARGET_RAISED``.
    """
    code = EXIT_TARGET_RAISED
    try:
        if not in_session:
            enter_session(on_session)
        spec = req.spec
        for fd, key in ((req.beat, "beat_fd"), (req.go, "go_fd")):
            if fd is not None:
                keep_fds |= {fd}
                spec = {**spec, key: fd}
        _setup_fds(req.stdout, req.stderr, keep_fds)
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)
        if req.env is not None:
            _replace_environ(req.env)
        if req.cwd is not None:
            os.chdir(req.cwd)
        if req.sys_path:
            sys.path[:0] = req.sys_path  # new entries get fresh finders; no cache to drop
        # The target is the daemon's own code: import it while still unconfined (a
        # dropped uid may not be able to read the interpreter's files any more).
        target = _resolve(req.target)
        if req.launch:
            _confine(req.launch)
        sys.argv = [req.target]
        target(spec)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        _flush_std()
        os._exit(code)


def _confine(launch: dict[str, Any]) -> None:
    """Apply the isolation launch sequence (cgroup ... seccomp) before any plugin code."""
    from osk_daemon.isolation.plan import LaunchPlan
    from osk_daemon.isolation.sequence import apply_in_child

    skipped = apply_in_child(LaunchPlan.from_wire(launch))
    for step in skipped:
        print(f"osk sandbox: not enforced on this host: {step}", file=sys.stderr, flush=True)


def main() -> NoReturn:
    """The exec launcher: read ``OSK_SPAWN_REQUEST``, then ``child_main`` on fds 1 and 2."""
    raw = os.environ.pop(REQUEST_ENV, None)
    try:
        if raw is None:
            raise ValueError(f"{REQUEST_ENV} is not set")
        data = msgpack.unpackb(base64.b64decode(raw), raw=False)
        beat = EXEC_BEAT_FD if data.get("beat") else None
        go = EXEC_GO_FD if data.get("go") else None
        req = request_from_wire(data, stdout=1, stderr=2, beat=beat, go=go)
    except Exception as exc:
        print(f"osk launch: bad spawn request: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_BAD_REQUEST)
    child_main(req)


if __name__ == "__main__":
    main()
