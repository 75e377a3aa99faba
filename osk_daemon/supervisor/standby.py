"""Hot standbys: a started spare process per instance, which a crash promotes.

Why: a restart through a warm zygote child still spends ~6 ms in the child before plugin
code runs — joining the instance's cgroups (on cgroup v1 a join can wait for an RCU grace
period), making the ZeroMQ socket and its I/O thread, importing the plugin's module —
besides the crashed process's own exit and the daemon's bookkeeping. A standby did all of
that before the crash: promoting it costs the daemon one byte on a socket, and the
plugin's ``start()`` runs well under a millisecond later.

How: with ``standby = true``, once an instance is READY the driver makes its next life
ahead of time (``ensure``, ``STANDBY_AFTER`` later, so its start does not take the CPU
from the new life's first requests): a fresh token, output FIFOs, a heartbeat page and
the instance's other cgroup slot (two per instance, taken in turn: the standby's quotas
are its own, and a crash can empty the dead life's cgroup without touching the standby),
spawned like any life, but by the zygote itself (the warm pool is for restarts of
plugins without one), with one end of a socket pair (``SpawnRequest.go``). Its worker
confines itself, imports the plugin's module, connects, says it is armed on that socket
(the daemon publishes ``plugin:standby``) and waits without a word to the broker
(``worker.runtime``, step 7). When the tree restarts the instance after an exit nobody
asked for (a crash, a hang, failed health checks), ``take`` hands the standby to
``InstanceProcesses.spawn``, which writes the byte and makes it the new life: Spawned,
then HELLO and READY as for any spawn, and its exit is that life's exit.

A requested stop or restart, a shutdown, or a config that changed since it was made
drops it (``discard``: SIGKILL, its parts released once it is reaped): an operator's
restart starts from the files on disk, and a standby only ever runs the code that was
imported when it was made. A standby that dies by itself is logged and not replaced until
the instance is READY again, so a plugin whose module cannot load does not fork in a loop.
The daemon's end of the socket is close-on-exec and dies with the daemon: after a crash or
``oskctl reexec`` of the daemon a standby reads EOF and exits, and the next daemon sweeps
its cgroup (only live lives are in the state file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from osk_daemon.config import PluginConfig
from osk_daemon.supervisor import unlinker
from osk_daemon.supervisor.confinement import Prepared
from osk_daemon.supervisor.instance import Instance
from osk_daemon.supervisor.lifecycle import State
from osk_daemon.supervisor.processes import LifeError, LifeParts, killpg
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.supervisor")

GO = b"\x01"
STANDBY_AFTER = 0.05  # s from READY to making the next standby


@dataclass(eq=False)
class Standby:
    inst: Instance
    config: PluginConfig  # what it was made for: another config drops it
    token: str  # its routing id, the life's token once promoted
    parts: LifeParts
    go: int  # the daemon's end of the go socket (non-blocking); -1 once written or closed
    loop: asyncio.AbstractEventLoop
    pid: int | None = None  # once the spawner says
    generation: int | None = None  # the instance's life it became, once promoted
    armed: bool = False  # its worker said so: it waits for the go

    def promote(self) -> bool:
        """Write the go byte; False if it cannot be (not spawned yet, or gone)."""
        if self.pid is None or self.go < 0:
            return False
        try:
            os.write(self.go, GO)
        except OSError:  # EPIPE: its process is gone, not reaped yet
            return False
        finally:
            self.close_go()
        return True

    def close_go(self) -> None:
        if self.go >= 0:
            self.loop.remove_reader(self.go)
            os.close(self.go)  # EOF ends a standby that still waits
            self.go = -1


class Standbys:
    """The standbys of one supervisor's instances, by instance."""

    def __init__(self, sup: Supervisor, reaper: ChildReaper) -> None:
        self._sup = sup
        self._reaper = reaper
        self._waiting: dict[str, Standby] = {}  # leaf -> its standby, until taken or dropped
        self._ending: dict[int, Standby] = {}  # pid -> a dropped standby, until reaped
        self._unspawned: set[Standby] = set()  # dropped before the spawner gave its pid
        self._rearm: set[str] = set()  # leaves to give a standby once their old one is gone

    def ready(self, inst: Instance) -> None:
        """``inst`` is READY: its standby is made ``STANDBY_AFTER`` from now, if it is
        still this life then (its first requests come first)."""
        if inst.config.standby:
            generation = inst.generation
            self._sup.loop.call_later(STANDBY_AFTER, self._ensure_for, inst, generation)

    def _ensure_for(self, inst: Instance, generation: int) -> None:
        if inst.generation == generation and inst.life.state is State.READY:
            self.ensure(inst)

    def renew(self, inst: Instance) -> None:
        """``inst`` runs another config now: its standby (made for the old one) goes, and
        a READY instance gets a new one if its plugin still wants one."""
        self.drop(inst, "its plugin's config changed")
        if inst.life.state is State.READY:
            self.ready(inst)

    def ensure(self, inst: Instance) -> None:
        """Make a standby for ``inst`` if its plugin wants one and it has none."""
        sup = self._sup
        if (
            not inst.config.standby
            or sup.shutting_down
            or inst.retiring
            or inst.leaf in self._waiting
            or inst.handover_from is not None  # that state is for the next life: spawn it
        ):
            return
        if self.held(inst):  # a dropped one still holds the other slot: wait until it is gone
            self._rearm.add(inst.leaf)
            return
        token = secrets.token_hex(16)
        ours, theirs = (s.detach() for s in socket.socketpair())  # close-on-exec, both
        os.set_blocking(ours, False)
        try:
            parts = sup.processes.life_parts(inst, token, 1 - inst.slot, go=theirs)
        except LifeError as exc:
            os.close(ours)
            os.close(theirs)
            log.warning("%s: no standby: %s", inst.leaf, exc)
            return
        standby = Standby(inst, inst.config, token, parts, ours, sup.loop)
        sup.loop.add_reader(ours, self._heard, standby)
        self._waiting[inst.leaf] = standby
        sup.processes.start_process(
            inst,
            parts.request,
            lambda pid: self._spawned(standby, pid),
            lambda why: self._spawn_failed(standby, why),
            warm=False,  # the warm pool is for restarts of plugins without a standby
        )

    def take(self, inst: Instance) -> Standby | None:
        """The standby to promote for ``inst``'s next life, if it has a usable one."""
        standby = self._waiting.pop(inst.leaf, None)
        if standby is None:
            return None
        if standby.config is not inst.config:
            self.discard(standby, "its plugin's config changed")
            return None
        if standby.pid is None:
            self.discard(standby, "it was not started yet")
            return None
        return standby

    def discard(self, standby: Standby, why: str) -> None:
        """Drop a standby that will not be used: SIGKILL; its parts go once it is reaped."""
        if self._waiting.get(standby.inst.leaf) is standby:
            del self._waiting[standby.inst.leaf]
        standby.close_go()
        log.info("%s: standby (pid %s) dropped: %s", standby.inst.leaf, standby.pid, why)
        if standby.pid is None:
            self._unspawned.add(standby)  # killed when its pid comes, or released on failure
            return
        self._ending[standby.pid] = standby
        killpg(standby.pid, 9)

    def drop(self, inst: Instance, why: str) -> None:
        """Drop ``inst``'s standby, if it has one."""
        standby = self._waiting.get(inst.leaf)
        if standby is not None:
            self.discard(standby, why)

    def drop_all(self, why: str) -> None:
        for standby in list(self._waiting.values()):
            self.discard(standby, why)

    def kill_all(self) -> None:
        """The daemon fails: SIGKILL every standby process now, waiting or dropped."""
        for standby in [*self._waiting.values(), *self._ending.values()]:
            if standby.pid is not None:
                killpg(standby.pid, 9)

    def held(self, inst: Instance) -> list[Prepared]:
        """The cgroup slots ``inst``'s standbys hold: the waiting one's and those of dropped
        ones not reaped yet (their slot is released when they are)."""
        leaf = inst.leaf
        mine = [s for s in (*self._ending.values(), *self._unspawned) if s.inst.leaf == leaf]
        waiting = self._waiting.get(leaf)
        return [s.parts.prepared for s in ([waiting] if waiting else []) + mine]

    @property
    def running(self) -> bool:
        """Some standby process may still be alive (waiting, or dropped and not reaped)."""
        return bool(self._waiting or self._ending or self._unspawned)

    def status(self, inst: Instance) -> dict[str, Any] | None:
        """``inst``'s standby for ``oskctl status``: its pid and whether it is armed."""
        standby = self._waiting.get(inst.leaf)
        if standby is None:  # one is coming once a dropped one is gone, or none
            return {"pid": None, "armed": False} if inst.leaf in self._rearm else None
        return {"pid": standby.pid, "armed": standby.pid is not None and standby.armed}

    # ---- its process ------------------------------------------------------------------

    def _heard(self, standby: Standby) -> None:
        """Its go socket is readable: ARMED, or EOF (it died: the reaper tells the rest)."""
        try:
            data = os.read(standby.go, 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            standby.loop.remove_reader(standby.go)
            return
        if not standby.armed and self._waiting.get(standby.inst.leaf) is standby:
            standby.armed = True
            self._sup.publish(
                standby.inst, "plugin:standby", f"armed (pid {standby.pid})", standby=standby.pid
            )

    def _spawned(self, standby: Standby, pid: int) -> None:
        standby.pid = pid
        self._reaper.watch(pid, lambda status: self._exited(standby, status))
        if standby in self._unspawned:  # dropped while it was being spawned
            self._unspawned.discard(standby)
            self._ending[pid] = standby
            killpg(pid, 9)

    def _spawn_failed(self, standby: Standby, why: str) -> None:
        log.warning("%s: no standby: %s", standby.inst.leaf, why)
        self._unspawned.discard(standby)
        if self._waiting.get(standby.inst.leaf) is standby:
            del self._waiting[standby.inst.leaf]
        standby.close_go()
        self._release(standby)

    def _exited(self, standby: Standby, status: ExitStatus) -> None:
        if standby.generation is not None:  # promoted: the end of the life it became
            self._sup.processes.child_exited(standby.inst, standby.generation, status)
            return
        dropped = self._ending.pop(status.pid, None) is standby
        if not dropped:
            if self._waiting.get(standby.inst.leaf) is standby:
                del self._waiting[standby.inst.leaf]
            standby.close_go()
            log.warning(
                "%s: its standby (pid %d) ended by itself (%s); restarts spawn as usual "
                "until it is ready again (its output is in oskctl logs)",
                standby.inst.leaf,
                status.pid,
                status,
            )
        self._release(standby)

    def _release(self, standby: Standby) -> None:
        parts = standby.parts
        parts.close_output()
        if parts.beat is not None:
            parts.beat.close(remove=unlinker.remove)
        self._sup.confinement.release(parts.prepared, final=True)
        inst = standby.inst
        if inst.leaf in self._rearm and not self.held(inst):
            self._rearm.discard(inst.leaf)
            if inst.life.state is State.READY:
                self.ready(inst)
        self._sup.check_all_stopped()
