"""Wiring: build everything from a config and run it until asked to stop.

Order matters at start-up. The daemon becomes a child subreaper and installs its
SIGCHLD reaper before anything can fork; the zygote is started before any ZeroMQ
context exists in a child; the broker binds before the first plugin spawns (workers
would reconnect anyway); the control socket opens last, once there is something to ask
about; systemd hears READY=1 once the critical plugins are up, and WATCHDOG=1 from this
loop all along (``observability.notify``). Shutdown runs the other way: the tree stops
every plugin in reverse start order, then the zygote, the broker and the control socket
close, and nothing is left behind.

A daemon that dies any other way (a crash, ``kill -9``) leaves its plugins running: the
next one, started on the same runtime dir, re-adopts them (``supervisor.adoption``) before
it sweeps cgroups or binds a socket. The runtime dir's lock file keeps two daemons from
sharing one.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import zmq

from osk_daemon.config import Config, SpawnMode
from osk_daemon.control.commands import DaemonCommands
from osk_daemon.control.server import serve_control
from osk_daemon.errors import BootFailed, ControlError, OskError
from osk_daemon.isolation.rlimits import inherited_open_files, raise_open_files
from osk_daemon.observability.notify import Notifier, Watchdog, announce, service_notifier
from osk_daemon.supervisor import unlinker
from osk_daemon.supervisor.adoption import find_survivors, output_dir
from osk_daemon.supervisor.confinement import Confinement
from osk_daemon.supervisor.reaper import ChildReaper, become_subreaper
from osk_daemon.supervisor.reload import reload_config
from osk_daemon.supervisor.runtime import Endpoints, Supervisor
from osk_daemon.supervisor.spawner import ExecSpawner, Spawner, ZygoteSpawner
from osk_daemon.versioning.planning import StartPlan, plan_start

log = logging.getLogger("osk.daemon")


def endpoints(runtime_dir: Path) -> Endpoints:
    return Endpoints(
        clients=f"ipc://{runtime_dir / 'broker.sock'}",
        workers=f"ipc://{runtime_dir / 'workers.sock'}",
    )


async def _reload_on_signal(sup: Supervisor) -> None:
    """SIGHUP: reload the config file; a refused reload is logged and changes nothing."""
    log.info("SIGHUP: reloading %s", sup.config.source)
    try:
        with service_notifier().reload_cycle():  # RELOADING=1 ... READY=1 for systemd
            await reload_config(sup)
    except OskError as exc:
        log.error("%s", exc)


def prepare_runtime_dir(path: Path) -> None:
    """0711: others may traverse (sandboxed plugins reach workers.sock), not list."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o711)
    output_dir(path).mkdir(mode=0o700, exist_ok=True)


# filesystems kept in memory: files made there cost no journal or block allocation
_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem_of(path: Path, mountinfo: str) -> str | None:
    """The type of the filesystem ``path`` (absolute, resolved) is on, from a
    ``/proc/self/mountinfo`` text: the mount with the longest mount point above it."""
    best, found = -1, None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = fields[4].replace("\\040", " ")
        if (path.is_relative_to(point)) and len(point) > best:
            best, found = len(point), tail[0]
    return found


def note_runtime_filesystem(path: Path) -> None:
    """Say so if the runtime dir is on a disk: every plugin life makes its output FIFOs
    and heartbeat page there, ~2 ms more a start on this VM's ext4 than on a tmpfs
    (a 500-plugin boot took 7.8-11.4 s against 6.6-6.9 s, measured)."""
    try:
        kind = filesystem_of(path.resolve(), Path("/proc/self/mountinfo").read_text())
    except OSError:
        return
    if kind is not None and kind not in _MEMORY_FILESYSTEMS:
        log.info(
            "runtime_dir %s is on %s, not a tmpfs: plugin starts make files there and are "
            "slower for it (systemd's /run is a tmpfs on most hosts)",
            path,
            kind,
        )


LOCK_FD_ENV = "OSK_DAEMON_LOCK_FD"  # the lock's fd, across the execv of oskctl reexec


def lock_runtime_dir(path: Path) -> int:
    """Hold ``runtime_dir/daemon.lock`` for the daemon's life (the kernel drops it when
    the process dies, however it dies). A second daemon on the same runtime dir is refused
    before it touches anything: the first one's plugins, cgroups and sockets are its own.
    After ``oskctl reexec`` the new image takes the lock the old one passed it
    (``LOCK_FD_ENV``): it was never free, so no other daemon could start in between."""
    inherited = _inherited_lock(path, os.environ.pop(LOCK_FD_ENV, None))
    if inherited is not None:
        return inherited
    fd = os.open(path / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ControlError(
            f"another daemon (pid {holder}) runs on {path}; stop it first, "
            "or give this one another daemon.runtime_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _inherited_lock(path: Path, value: str | None) -> int | None:
    """The fd of ``path/daemon.lock`` the image before an execv held, if ``value`` names
    one that still holds the lock; None otherwise (then the lock is taken afresh)."""
    if value is None:
        return None
    try:
        fd = int(value)
        got, lock = os.fstat(fd), (path / "daemon.lock").stat()
    except (ValueError, OSError):
        return None
    if (got.st_dev, got.st_ino) != (lock.st_dev, lock.st_ino):
        return None  # not the lock file: not ours to close either
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held through this fd: a no-op
    except OSError:
        os.close(fd)
        return None
    os.set_inheritable(fd, False)
    return fd


def secure_sockets(runtime_dir: Path) -> None:
    """Callers' socket for root/owner only; the workers' socket open to plugin uids."""
    (runtime_dir / "broker.sock").chmod(0o600)
    (runtime_dir / "workers.sock").chmod(0o666)


async def _reexec(
    sup: Supervisor, notifier: Notifier, wanted: Callable[[], bool], lock: int
) -> None:
    """Replace this process with a fresh start of the daemon (an upgraded one, if it was
    upgraded), keeping the pid and every plugin: ``oskctl reexec``.

    The state file is written now, the control reply is let out, and ``execv`` runs the
    same command line again. Every fd of ours is close-on-exec (sockets, pidfds, output
    FIFOs) but the lock's, which the new image takes over (``lock_runtime_dir``), so it
    starts clean and no other daemon can start meanwhile: it re-adopts the plugins, which are
    still its children (their exits keep their exact status), and binds the same sockets.
    The old zygote sees EOF and exits; the new image reaps it. systemd sees the same main
    pid reloading, then READY=1 again. Returns (without exec) if a SIGTERM came meanwhile.
    """
    argv = [sys.executable, *sys.orig_argv[1:]]
    log.info("re-executing %s; the plugins keep running", " ".join(argv))
    notifier.reloading()
    for _ in range(10):  # let the control server write its reply to oskctl
        await asyncio.sleep(0)
    if not wanted():  # SIGTERM meanwhile: stop instead
        return
    sup.state_file.write()  # last: nothing runs on the loop between this and execv
    sup.state_file.flush()
    if sup.tracer is not None:
        sup.tracer.shutdown()
    for handler in logging.getLogger().handlers:
        handler.flush()
    inherited = inherited_open_files()
    if inherited is not None:  # the new image raises it again and knows what plugins get
        resource.setrlimit(resource.RLIMIT_NOFILE, inherited)
    os.set_inheritable(lock, True)
    os.environ[LOCK_FD_ENV] = str(lock)
    os.execv(sys.executable, argv)


async def run_daemon(
    config: Config, *, on_ready: Callable[[Supervisor], None] | None = None
) -> None:
    """Run the daemon in the current asyncio loop until SIGTERM/SIGINT or ``shutdown``."""
    plan = plan_start(config)  # raises ConfigError for a conflict, explained
    for warning in plan.warnings:
        log.warning("start order: %s", warning)
    config = plan.config
    d = config.daemon
    os.umask(0o077)  # sockets and files the daemon creates are its own until it says else
    raised = raise_open_files()  # a few fds per plugin; systemd's soft limit is 1024
    if raised is not None:
        log.info(
            "open files limit raised from %d to %d (plugins keep %d)",
            raised[0],
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            raised[0],
        )
    prepare_runtime_dir(d.runtime_dir)
    note_runtime_filesystem(d.runtime_dir)
    lock = lock_runtime_dir(d.runtime_dir)
    try:
        await _run_locked(plan, on_ready, lock)
    finally:
        os.close(lock)


async def _run_locked(
    plan: StartPlan, on_ready: Callable[[Supervisor], None] | None, lock: int
) -> None:
    import asyncio

    config = plan.config
    d = config.daemon
    survivors = find_survivors(config)  # what a previous daemon left running, re-adopted
    confinement = Confinement.open(config, keep=survivors.cgroups)
    try:
        warnings = confinement.check()  # raises ConfigError for what cannot be enforced
    except BaseException:
        confinement.close(keep=survivors.cgroups)  # a later, fixed start adopts them
        raise
    for warning in warnings:
        log.warning("sandbox degraded: %s", warning)
    become_subreaper()
    loop = asyncio.get_running_loop()
    reaper = ChildReaper()
    reaper.install(loop)
    notifier = service_notifier()  # sd_notify; a no-op outside systemd
    watchdog = Watchdog(notifier, loop)  # WATCHDOG=1 from this loop: a stall stops it
    zygote: ZygoteSpawner | None = None
    supervisor: Supervisor | None = None
    left_running = False  # the daemon failed and left its plugins for the next one
    try:
        watchdog.start()
        zygote = await ZygoteSpawner.open(  # boots meanwhile: re-adopting needs no zygote
            reaper,
            preload=("osk_daemon.worker.runtime", "osk_daemon.isolation.sequence"),
            wait=False,
        )
        spawners: dict[SpawnMode, Spawner] = {
            SpawnMode.ZYGOTE: zygote,
            SpawnMode.EXEC: ExecSpawner(),
        }
        stop = anyio.Event()
        reexec: list[bool] = []  # oskctl reexec asked for it

        def ask_reexec() -> None:
            reexec.append(True)
            stop.set()

        def ask_stop() -> None:  # SIGTERM/SIGINT: a stop wins over a re-exec asked before
            reexec.clear()
            stop.set()

        async with anyio.create_task_group() as tg:
            supervisor = sup = Supervisor(
                plan, tg, reaper, spawners, endpoints(d.runtime_dir), confinement, survivors
            )
            secure_sockets(d.runtime_dir)
            commands = DaemonCommands(supervisor, stop.set, ask_reexec)
            # the control socket first: a second daemon on the same runtime dir fails
            # here, before it has started any plugin
            await tg.start(
                partial(serve_control, allowed_group=d.control_group), d.control_socket, commands
            )
            supervisor.start(request_stop=stop.set)
            # what exists now (modules, config models, the tree) lives as long as the
            # daemon: out of the collector's sight, a full collection no longer walks it
            # (35-40 ms measured, every broker call waiting meanwhile). The price: a
            # start-up object that later ends in a reference cycle (a config replaced by
            # a reload, say) is freed only if its count drops to zero, not by the collector
            gc.collect()
            gc.freeze()
            tg.start_soon(announce, notifier, sup)  # READY=1 once critical plugins are up
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, ask_stop)
            loop.add_signal_handler(signal.SIGHUP, tg.start_soon, _reload_on_signal, sup)
            log.info(
                "osk-daemon running %d plugin(s); control socket %s; cgroups %s",
                len(config.plugins),
                d.control_socket,
                confinement.cgroups.version if confinement.cgroups else "off",
            )
            if on_ready is not None:
                on_ready(supervisor)
            await stop.wait()
            if reexec and not sup.shutting_down:
                await _reexec(sup, notifier, lambda: bool(reexec), lock)  # returns if stopped
            log.info("shutting down")
            notifier.stopping(sup.deps.boot_failure or "")
            await supervisor.shutdown()
            unlinker.flush()  # every ended life's files are gone before we are
            tg.cancel_scope.cancel()
    except BaseException:
        if supervisor is not None and d.orphan_timeout > 0 and not supervisor.shutting_down:
            # a crash like any other: the plugins wait for the next daemon to adopt them
            log.critical(
                "the daemon failed; its plugins run on for up to %gs (daemon.orphan_timeout),"
                " for the next daemon to re-adopt",
                d.orphan_timeout,
            )
            supervisor.state_file.write()
            supervisor.state_file.flush()
            left_running = True
        elif supervisor is not None:
            log.critical("the daemon failed; killing its plugins so none is orphaned")
            supervisor.kill_all()
        raise
    finally:
        watchdog.cancel()
        previous = {}
        loop.remove_signal_handler(signal.SIGHUP)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
            # a second SIGTERM during the last cleanup must not cut it short and orphan
            # the zygote or leave cgroups behind
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
        if zygote is not None:
            await zygote.aclose()
        # kills and removes every instance cgroup left, unless the plugins run on
        confinement.close(keep=None if left_running else ())
        reaper.uninstall()
        zmq.Context.instance().destroy(linger=0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("osk-daemon stopped")
    if sup.deps.boot_failure is not None:
        raise BootFailed(sup.deps.boot_failure, sup.deps.rolled_back)
