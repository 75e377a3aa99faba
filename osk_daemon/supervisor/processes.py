"""The process side of the driver: spawn an instance, watch it exit, signal it.

``InstanceProcesses`` turns the lifecycle's Spawn and Signal effects into real processes:
it confines the instance (cgroup, state dir, launch plan), opens its output pipes,
asks the spawner (zygote, or exec for paranoid sandboxes) for a process, and registers
the pid with the reaper. Exits come back as ``Exited`` events with the exact code or
signal, and ``oom`` when the kernel's OOM killer ended it inside its memory limit. A
process a previous daemon started is ``adopt``-ed instead (see ``adoption``).

Signals go to the instance's process group (each plugin is its own session); SIGKILL
also empties its cgroup, so nothing a plugin forked survives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyio.abc import TaskGroup

from osk_daemon.config import SandboxLevel, SpawnMode
from osk_daemon.errors import OskError
from osk_daemon.ipc.beats import Beat, beat_path
from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.supervisor import unlinker
from osk_daemon.supervisor.adoption import Survivor, output_dir
from osk_daemon.supervisor.confinement import Confinement, Prepared
from osk_daemon.supervisor.instance import WORKER_TARGET, Instance
from osk_daemon.supervisor.output import open_output, output_fifos
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus
from osk_daemon.supervisor.runtime_state import parent_of, start_ticks
from osk_daemon.supervisor.spawner import Spawner, SpawnRequest

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor
    from osk_daemon.supervisor.standby import Standby

log = logging.getLogger("osk.supervisor")

SPAWN_BATCH = 8  # spawns prepared per loop pass beyond the first (see spawn)


class LifeError(OskError):
    """What a life could not be given (its cgroup, its output pipes)."""


@dataclass
class LifeParts:
    """What one life runs in (``InstanceProcesses.life_parts``), before it is the
    instance's: a spawn makes them its own at once, a standby when it is promoted."""

    slot: int
    prepared: Prepared
    fifos: tuple[Path, Path]
    close_output: Callable[[], None]
    beat: Beat | None
    request: SpawnRequest


class InstanceProcesses:
    def __init__(
        self,
        supervisor: Supervisor,
        tg: TaskGroup,
        reaper: ChildReaper,
        spawners: dict[SpawnMode, Spawner],
        endpoint: str,
        confinement: Confinement,
    ) -> None:
        self._sup = supervisor
        self._tg = tg
        self._reaper = reaper
        self._spawners = spawners
        self._endpoint = endpoint
        self._confinement = confinement
        self._loop = asyncio.get_running_loop()
        self._output_dir = output_dir(supervisor.config.daemon.runtime_dir)
        self._sample_next = 0  # where the next usage sample starts (taking turns)
        self._queued: deque[tuple[Instance, int]] = deque()  # spawns waiting for a later pass
        self._busy = False  # a spawn ran in this loop pass

    def spawn(self, inst: Instance) -> None:
        """Start a new life of ``inst``; the outcome arrives as lifecycle events.

        An instance's standby (``standby``), if it has one, becomes the new life at once.
        Otherwise the first spawn of a loop pass starts at once (a restart never waits);
        more in the same pass (a boot of hundreds) go ``SPAWN_BATCH`` per later pass, so
        the first ones reach the zygote while the rest are still being prepared, and the
        loop keeps serving meanwhile (each costs the daemon a few ms: cgroup, FIFOs,
        request). A gentle start (other instances of the plugin serve meanwhile: a
        rollout's) is split into two steps on later passes (``_confine_first``).
        """
        standby = self._sup.standbys.take(inst)
        if standby is not None and self._promote(inst, standby):
            return
        self._new_life(inst, secrets.token_hex(16))
        if inst.gentle_start:  # others of its plugin serve: it starts in smaller steps
            self._loop.call_soon(self._confine_first, inst, inst.generation)
            return
        if self._busy:
            self._queued.append((inst, inst.generation))
            return
        self._busy = True
        self._loop.call_soon(self._next_batch)
        self._start_life(inst)

    def _next_batch(self) -> None:
        try:
            for _ in range(min(SPAWN_BATCH, len(self._queued))):
                self._start_queued(*self._queued.popleft())
        finally:  # whatever happened, the queue keeps moving
            if self._queued:
                self._loop.call_soon(self._next_batch)
            else:
                self._busy = False

    def _confine_first(self, inst: Instance, generation: int) -> None:
        """A gentle start's first step: its cgroup, state dir and plan (kept, so the next
        step finds them made), then the rest on the next loop pass. Each step costs the
        loop well under a millisecond, so calls to the instances that serve meanwhile
        wait for neither for long."""
        if generation != inst.generation:
            return
        try:
            prepared = self._confinement.prepare(inst.plugin, inst.config, inst.index, inst.slot)
        except OskError:
            pass  # the next step says why, as for any spawn
        else:
            self._cap_start(inst, prepared)
        self._loop.call_soon(self._start_queued, inst, generation)

    def _cap_start(self, inst: Instance, prepared: Prepared) -> None:
        """Cap a gentle start's CPU (``rollout.start_cpu``) until ``lift_start_cap``.

        Why: a new process's start is mostly the kernel copying the zygote's pages on
        write; nice values and SCHED_IDLE did not keep that from stalling the calls served
        meanwhile, a CFS quota on its cgroup does (``bench/swap.py``: p99 during swaps
        ~10-13 ms without, ~1-2.5 ms at 0.01 cores). The start takes longer instead, so
        the cap is bounded by ``rollout.start_cpu_for`` seconds.
        """
        cores = inst.config.rollout.start_cpu
        cgroup = prepared.cgroup
        if not cores or cgroup is None:
            return
        limit = inst.config.limits.cpu
        self.lift_start_cap(inst)  # an earlier life's, if one was left (before: same slot)
        try:
            cgroup.set_cpu_max(min(cores, limit) if limit is not None else cores)
        except OskError as exc:  # no cpu controller here: the start is only reniced
            log.debug("%s: no start CPU cap: %s", inst.leaf, exc)
            return
        lift = self._loop.call_later(inst.config.rollout.start_cpu_for, self.lift_start_cap, inst)
        inst.start_cap = (lift, cgroup)

    def lift_start_cap(self, inst: Instance) -> None:
        """End a gentle start's CPU cap (ready, too slow, or gone): its cgroup gets the
        plugin's own ``limits.cpu`` again, or none. Nothing to do without a cap."""
        if inst.start_cap is None:
            return
        (lift, cgroup), inst.start_cap = inst.start_cap, None
        lift.cancel()
        inst.last_seen = max(inst.last_seen, time.monotonic())  # silence counts from now
        try:
            cgroup.set_cpu_max(inst.config.limits.cpu)
        except OskError as exc:
            log.warning("%s: could not lift the start CPU cap: %s", inst.leaf, exc)

    def _start_queued(self, inst: Instance, generation: int) -> None:
        if generation != inst.generation:  # a newer life began meanwhile
            return
        try:
            self._start_life(inst)
        except Exception as exc:  # a bug in one spawn must not stop every later one
            log.exception("%s: spawn failed", inst.leaf)
            self._loop.call_soon(self._spawn_failed, inst, generation, f"spawn failed: {exc}")

    def _start_life(self, inst: Instance) -> None:
        try:
            parts = self.life_parts(inst, inst.token, inst.slot)
        except LifeError as exc:
            log.error("%s: %s, not starting it", inst.leaf, exc)
            self._loop.call_soon(self._spawn_failed, inst, inst.generation, str(exc))
            return
        self._begin_life(inst, parts)
        generation = inst.generation

        def spawned(pid: int) -> None:
            self._spawned(inst, generation, pid)
            self._reaper.watch(pid, lambda st: self.child_exited(inst, generation, st))

        def failed(reason: str) -> None:
            self._spawn_failed(inst, generation, reason)

        self.start_process(inst, parts.request, spawned, failed)

    def life_parts(self, inst: Instance, token: str, slot: int, go: int | None = None) -> LifeParts:
        """What one life of ``inst`` runs in and with: its cgroup (``slot``), output FIFOs
        and their readers, heartbeat page, and the spawn request (a standby's, with
        ``go``). Raises ``LifeError`` saying what could not be made."""
        try:
            prepared = self._confinement.prepare(inst.plugin, inst.config, inst.index, slot)
        except OskError as exc:
            raise LifeError(f"cannot confine it: {exc}") from exc
        fifos = output_fifos(self._output_dir, inst.plugin, inst.index, token)
        try:
            out_w, err_w, close_output = open_output(
                self._loop, inst.plugin, inst.index, self._sup.logs[inst.plugin], fifos
            )
        except OSError as exc:
            raise LifeError(f"cannot make its output pipes: {exc}") from exc
        beat, beat_fd = None, None
        try:
            beat, beat_fd = Beat.create(beat_path(fifos[0]))
        except OSError as exc:  # its worker then sends its heartbeats as frames
            log.warning("%s: no heartbeat page (%s); heartbeats come as frames", inst.leaf, exc)
        request = SpawnRequest(
            target=WORKER_TARGET,
            spec=inst.worker_spec(
                self._sup.config, self._endpoint, token=None if go is None else token
            ),
            env=inst.worker_env(),
            cwd=str(self._confinement.state_dir(inst.plugin)),
            sys_path=tuple(str(p) for p in inst.config.path),
            stdout=out_w,
            stderr=err_w,
            launch=prepared.wire,
            beat=beat_fd,
            go=go,
        )
        return LifeParts(slot, prepared, fifos, close_output, beat, request)

    def _begin_life(self, inst: Instance, parts: LifeParts) -> None:
        """Make ``parts`` the current life's: the broker expects its token from now on,
        and the previous life's output readers close."""
        self._sup.broker.expect(inst.token, inst.key)
        if inst.close_output is not None:
            inst.close_output()
        inst.slot, inst.prepared = parts.slot, parts.prepared
        inst.fifos, inst.close_output, inst.beat = parts.fifos, parts.close_output, parts.beat

    def start_process(
        self,
        inst: Instance,
        request: SpawnRequest,
        spawned: Callable[[int], None],
        failed: Callable[[str], None],
        *,
        warm: bool = True,
    ) -> None:
        """Hand ``request`` to the instance's spawner; ``spawned(pid)`` or ``failed(why)``
        follows on a later loop pass (never inside the caller's ``feed``). ``warm=False``:
        not from a warm zygote child (``Spawner.spawn``)."""
        spawner = self._spawner_for(inst)
        if not warm:
            self._tg.start_soon(self._do_spawn, inst, spawner, request, spawned, failed, warm)
            return
        try:  # a warm zygote child takes it now, without a task switch on the restart path
            pid = spawner.spawn_now(request)
        except OskError as exc:
            self._spawn_ended(request)
            log.error("%s: could not spawn: %s", inst.leaf, exc)
            self._loop.call_soon(failed, str(exc))
            return
        if pid is None:
            self._tg.start_soon(self._do_spawn, inst, spawner, request, spawned, failed)
            return
        self._spawn_ended(request)
        self._loop.call_soon(spawned, pid)

    def _promote(self, inst: Instance, standby: Standby) -> bool:
        """Make ``standby`` the new life of ``inst`` (one byte on its go pipe); False if it
        is gone (the caller spawns as usual)."""
        if not standby.promote():
            self._sup.standbys.discard(standby, "it was gone when needed")
            return False
        self._new_life(inst, standby.token)
        self._begin_life(inst, standby.parts)
        generation = standby.generation = inst.generation  # its exits are this life's now
        assert standby.pid is not None
        self._loop.call_soon(self._spawned, inst, generation, standby.pid)
        return True

    def adopt(self, inst: Instance, survivor: Survivor) -> None:
        """Take over a process a previous daemon started (``adoption``): its cgroup, its
        output FIFOs and its routing id; READY follows its first frame. Its exit is seen
        through its pidfd, with the status unknown, unless it is still our child (the
        daemon re-executed itself): then the reaper has its exact status, as for a spawn."""
        record, pidfd = survivor.record, survivor.pidfd
        self._new_life(inst, record.token)
        inst.start_ticks = record.start_ticks
        inst.slot = record.slot
        inst.state_slot = record.state_slot
        inst.prepared = self._confinement.adopt(inst.plugin, inst.config, inst.index, inst.slot)
        inst.fifos = (Path(record.stdout), Path(record.stderr))
        inst.beat = Beat.attach(beat_path(inst.fifos[0]))
        try:
            _, _, inst.close_output = open_output(
                self._loop,
                inst.plugin,
                inst.index,
                self._sup.logs[inst.plugin],
                inst.fifos,
                adopt=True,
            )
        except OSError as exc:  # it runs on; only its output is not captured
            log.error("%s: cannot read its output FIFOs: %s", inst.leaf, exc)
        self._sup.broker.adopt(inst.key, record.token)
        inst.adopting = True
        generation = inst.generation
        self._sup.feed(inst, lc.Adopted(record.pid))
        pid = record.pid
        # after oskctl reexec it is still our child (or was, and we reaped it meanwhile)
        if parent_of(pid) == os.getpid() or self._reaper.stashed(pid):
            os.close(pidfd)
            self._reaper.watch(record.pid, lambda st: self.child_exited(inst, generation, st))
        else:
            self._loop.add_reader(pidfd, self._foreign_exited, inst, generation, pidfd)
        log.info("%s: re-adopted pid %d", inst.leaf, record.pid)

    def _foreign_exited(self, inst: Instance, generation: int, pidfd: int) -> None:
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        pid = inst.life.pid or 0
        self.child_exited(inst, generation, ExitStatus(pid, None, None))

    def _new_life(self, inst: Instance, token: str) -> None:
        """Reset what belongs to one life of ``inst`` (spawned or adopted)."""
        self.drop_beat(inst)
        inst.generation += 1
        inst.token = token
        inst.spawned_at = inst.last_seen = time.monotonic()
        inst.exited = asyncio.Event()
        inst.usage = {}
        inst.adopting = False
        inst.sandbox_degraded = self._confinement.degradation(inst.plugin)

    def signal(self, inst: Instance, signum: int) -> None:
        if inst.life.pid is not None:
            killpg(inst.life.pid, signum)
        if signum == 9 and inst.prepared is not None and inst.prepared.cgroup is not None:
            try:
                inst.prepared.cgroup.kill()
            except OskError as exc:
                log.warning("%s: cgroup kill failed: %s", inst.leaf, exc)

    def drop_beat(self, inst: Instance) -> None:
        """Close the heartbeat page of a life that ended; its file goes on the unlink
        thread (``unlinker``)."""
        if inst.beat is not None:
            inst.beat.close(remove=unlinker.remove)
            inst.beat = None

    def release(self, inst: Instance, *, final: bool) -> bool:
        """Clean up after a life; True if it was OOM-killed. ``final`` (the instance
        stops): both its cgroup slots go, but one a dropped standby still holds."""
        self.drop_beat(inst)
        prepared, inst.prepared = inst.prepared, None
        oom = False if prepared is None else self._confinement.release(prepared, final=final)
        if final:
            self.forget(inst)
        return oom

    def forget(self, inst: Instance) -> None:
        """Remove every cgroup slot ``inst`` has kept (it stopped, or it is removed)."""
        held = self._sup.standbys.held(inst)
        self._confinement.dispose_slots(inst.plugin, inst.index, keep=held)

    def sample_usage(self, most: int) -> None:
        """Read the cgroups of up to ``most`` live instances, taking turns (each read costs
        about 0.3 ms: 500 instances every second would keep the daemon 15 % busy at idle);
        publish limits hit since the last look."""
        live = [i for i in self._sup.instances.values() if i.live and i.prepared is not None]
        if not live:
            return
        start = self._sample_next % len(live)
        batch = (live[start:] + live[:start])[:most]
        self._sample_next = start + len(batch)
        for inst in batch:
            assert inst.prepared is not None
            inst.usage, hits = self._confinement.sample(inst.leaf, inst.prepared)
            for limit in hits:
                self._sup.publish(inst, "plugin:limit", f"hit its {limit} limit", limit=limit)

    def _spawn_failed(self, inst: Instance, generation: int, reason: str) -> None:
        if generation == inst.generation:
            self._sup.feed(inst, lc.SpawnFailed(reason))

    def _spawner_for(self, inst: Instance) -> Spawner:
        if inst.config.sandbox.level is SandboxLevel.PARANOID:
            return self._spawners[SpawnMode.EXEC]  # a fresh interpreter: nothing inherited
        return self._spawners[inst.config.spawn]

    @staticmethod
    def _spawn_ended(request: SpawnRequest) -> None:
        os.close(request.stdout)  # the child has its own copies
        os.close(request.stderr)
        for fd in (request.beat, request.go):
            if fd is not None:
                os.close(fd)

    async def _do_spawn(
        self,
        inst: Instance,
        spawner: Spawner,
        request: SpawnRequest,
        spawned: Callable[[int], None],
        failed: Callable[[str], None],
        warm: bool = True,
    ) -> None:
        try:
            pid = await spawner.spawn(request, warm=warm)
        except OskError as exc:
            log.error("%s: could not spawn: %s", inst.leaf, exc)
            failed(str(exc))
            return
        finally:
            self._spawn_ended(request)
        spawned(pid)

    def _spawned(self, inst: Instance, generation: int, pid: int) -> None:
        if generation != inst.generation:  # pragma: no cover - a newer life began meanwhile
            killpg(pid, 9)
            return
        inst.start_ticks = start_ticks(pid)  # with the pid, it names this process for good
        self._sup.feed(inst, lc.Spawned(pid))

    def child_exited(self, inst: Instance, generation: int, status: ExitStatus) -> None:
        if generation == inst.generation and inst.live:
            oom = self._sup.release(inst)
            if oom:
                self._sup.publish(inst, "plugin:oom", "killed by the kernel at its memory limit")
            self._sup.feed(inst, lc.Exited(status.code, status.signal, oom))


def killpg_only(pgid: int, signum: int) -> None:
    """Signal what is left of a process group; Linux keeps a group's id from reuse."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def killpg(pid: int, signum: int) -> None:
    """Signal the plugin's whole process group (it is a session leader), else the process."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:  # no group yet: the child has not reached setsid()
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
