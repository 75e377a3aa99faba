"""Spawn -> HELLO -> READY of a real worker process: zygote (warm pool / cold fork) vs exec.

The bench process plays the daemon's part, using the package's own pieces: it becomes a
child subreaper, installs a ``ChildReaper`` on its asyncio loop, binds a plain ROUTER on an
``ipc://`` endpoint and starts ``osk_daemon.worker.runtime:run_worker`` with a spec built
the way ``Instance.worker_spec`` builds it (daemon defaults, the ``benchplugins:Stamp``
plugin from ``bench/plugins``), through ``ZygoteSpawner`` (preloading what the daemon
preloads) with its default warm pool ("warm": a pre-forked child takes the request), through
a ``ZygoteSpawner`` with ``warm=0`` ("cold": one ``clone(CLONE_PARENT)`` per request, or a
double fork with ``OSK_ZYGOTE_DOUBLE_FORK=1``) and through
``ExecSpawner``. Per round: ``t0`` just before ``spawn()``, then the
times ``spawn()`` returned the pid, the worker's HELLO arrived (runtime up, socket
connected) and its READY arrived (plugin imported and ``start()`` returned: the broker
would route calls to it from here). Then a STOP frame, and the exit is awaited through the
reaper (exit code 0 expected) before the next round, so rounds do not overlap.

Then the same rounds per sandbox level (none, minimal, standard, strict, paranoid), with the
request carrying a launch plan built the way ``Confinement._plan`` builds it:
``plan_for_level(level, parent_pid=<bench pid>, uid/gid of 'nobody' (standard+),
read_paths=default_read_paths([bench/plugins]), state_dir=<state dir>)``, the network
not granted, ``require=True`` and ``cwd`` the state dir (owned by nobody, 0700, its parent
0711, as ``_make_state_dir`` leaves it). The spawner is the one the daemon picks: the warm
zygote, except paranoid, which always goes through ``ExecSpawner``. No cgroups: the plan's
``cgroup_procs`` is empty (the join is one write per hierarchy; the quota setup happens
before the spawn in the daemon and is not timed here). Because standard+ workers run as
nobody, the work dir is made 0711 and the ROUTER's socket file 0666. A level the kernel
cannot enforce (``check_plan``) is reported and skipped, as the daemon would refuse it.

    python bench/spawn.py [--json] [--rounds N]   # rounds per mode and level (default 30)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from _common import (
    PERCENTILE_METHOD,
    PLUGINS,
    emit,
    machine,
    ms,
    parse_args,
    run_main,
    summarize,
    table,
    temp_dir,
    verdict,
)

from osk_daemon.config import DaemonConfig
from osk_daemon.ipc.codec import Kind, encode_header, split_router_frames, unpack
from osk_daemon.isolation.plan import (
    LaunchPlan,
    SandboxLevel,
    check_plan,
    default_read_paths,
    plan_for_level,
    probe_kernel,
)
from osk_daemon.supervisor.confinement import resolve_user
from osk_daemon.supervisor.instance import WORKER_TARGET
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus, become_subreaper
from osk_daemon.supervisor.spawner import ExecSpawner, Spawner, SpawnRequest, ZygoteSpawner

WARMUP = 3
DEADLINE = 15.0
GOAL_ZYGOTE_READY = 0.010
PHASES = (("pid", "spawn() returned the pid"), ("hello", "HELLO"), ("ready", "READY"))
# What ``osk_daemon.daemon`` has its zygote preload.
DAEMON_PRELOAD = ("osk_daemon.worker.runtime", "osk_daemon.isolation.sequence")
PLUGIN_USER = "nobody"  # SandboxConfig.user's default


def worker_spec(endpoint: str, token: str) -> dict[str, Any]:
    """What ``Instance.worker_spec`` sends, with the daemon's default settings."""
    d = DaemonConfig()
    return {
        "plugin": "stamp",
        "instance": 0,
        "version": "0.0.0",
        "entry": "benchplugins:Stamp",
        "path": [str(PLUGINS)],
        "config": {},
        "endpoint": endpoint,
        "token": token,
        "heartbeat_interval": d.heartbeat_interval,
        "max_message_size": int(d.max_message_size),
        "call_timeout": d.call_timeout,
        "log_level": d.log_level.upper(),
    }


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(OSK_PLUGIN="stamp", OSK_INSTANCE="0")
    return env


class Bench:
    """The daemon's side of one worker at a time: spawn, HELLO, READY, STOP, reap."""

    def __init__(self, reaper: ChildReaper, sock: zmq.asyncio.Socket, endpoint: str, out: int):
        self.reaper = reaper
        self.sock = sock
        self.endpoint = endpoint
        self.out = out
        self.live: set[int] = set()

    async def round(
        self, spawner: Spawner, plan: LaunchPlan | None = None, cwd: str | None = None
    ) -> dict[str, float]:
        token = secrets.token_hex(16)
        req = SpawnRequest(
            target=WORKER_TARGET,
            spec=worker_spec(self.endpoint, token),
            env=worker_env(),
            cwd=cwd,
            sys_path=(str(PLUGINS),),
            stdout=self.out,
            stderr=self.out,
            launch=None if plan is None else plan.to_wire(),
        )
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        pid = await spawner.spawn(req)
        t_pid = time.perf_counter()
        self.live.add(pid)
        exited: asyncio.Future[ExitStatus] = loop.create_future()

        def on_exit(status: ExitStatus) -> None:
            if not exited.done():
                exited.set_result(status)

        self.reaper.watch(pid, on_exit)
        async with asyncio.timeout(DEADLINE):
            rid, t_hello, t_ready = await self._hello_ready(token, exited)
            if plan is not None:  # after READY, outside the timed part
                check_confined(pid, plan)
            await self.sock.send_multipart([rid, encode_header(Kind.STOP), b""])
            status = await exited
        self.live.discard(pid)
        if status.code != 0:
            raise RuntimeError(f"worker did not exit cleanly after STOP: {status}")
        return {"pid": t_pid - t0, "hello": t_hello - t0, "ready": t_ready - t0}

    async def _hello_ready(
        self, token: str, exited: asyncio.Future[ExitStatus]
    ) -> tuple[bytes, float, float]:
        rid, t_hello = b"", 0.0
        while True:
            recv = asyncio.ensure_future(self.sock.recv_multipart())
            either: set[asyncio.Future[Any]] = {recv, exited}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not recv.done():
                recv.cancel()
                raise RuntimeError(f"worker died before READY: {exited.result()}")
            frames = recv.result()
            now = time.perf_counter()
            peer, header, body = split_router_frames(frames)
            if header.kind is Kind.HELLO and unpack(body).get("token") == token:
                rid, t_hello = peer, now
            elif peer != rid or not rid:
                continue  # an earlier worker's last frames
            elif header.kind is Kind.READY:
                return rid, t_hello, now
            elif header.kind is Kind.START_FAILED:
                raise RuntimeError(f"plugin failed to start: {unpack(body)}")

    async def samples(
        self, spawner: Spawner, rounds: int, plan: LaunchPlan | None = None, cwd: str | None = None
    ) -> dict[str, Any]:
        """``WARMUP`` + ``rounds`` rounds; per-phase stats of the last ``rounds``."""
        samples = [await self.round(spawner, plan, cwd) for _ in range(WARMUP + rounds)][WARMUP:]
        stats = {key: summarize([s[key] for s in samples]) for key, _ in PHASES}
        return {**stats, "rounds": samples}

    async def cleanup(self) -> None:
        for pid in self.live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.live.clear()


def state_dir(workdir: Path, uid: int, gid: int) -> Path:
    """The plugin's state dir as ``Confinement._make_state_dir`` leaves it; ``workdir``
    (where the ROUTER's socket goes) becomes traversable for the plugin uid."""
    workdir.chmod(0o711)
    path = workdir / "state" / "stamp"
    path.mkdir(parents=True)
    path.parent.chmod(0o711)
    path.chmod(0o700)
    os.chown(path, uid, gid)
    return path


def confinement_of(pid: int) -> dict[str, Any]:
    """What /proc shows of a process's confinement (Landlock is not visible there)."""
    proc = Path(f"/proc/{pid}")
    fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())

    def own_ns(kind: str) -> bool:
        return (proc / "ns" / kind).readlink() != Path("/proc/self/ns", kind).readlink()

    return {
        "uid": int(fields["Uid"].split()[1]),
        "no_new_privs": fields["NoNewPrivs"].strip() == "1",
        "seccomp": fields["Seccomp"].strip() == "2",
        "cap_bnd_empty": int(fields["CapBnd"], 16) == 0,
        "own_net_ns": own_ns("net"),
        "own_user_ns": own_ns("user"),
    }


def check_confined(pid: int, plan: LaunchPlan) -> None:
    """Raise unless the READY worker shows what ``plan`` asks for (a sanity check that
    the timed rounds really paid for the sandbox)."""
    want = {
        "uid": plan.uid if plan.uid is not None else os.getuid(),
        "no_new_privs": plan.restricts_self,
        "seccomp": plan.seccomp != "off",
        "cap_bnd_empty": plan.landlock,
        "own_net_ns": not plan.network,
        "own_user_ns": plan.user_namespace,
    }
    got = confinement_of(pid)
    if got != want:
        raise RuntimeError(f"{plan.level} worker {pid}: confinement {got}, expected {want}")


def share_socket(path: Path) -> None:
    """standard+ workers run as nobody and must be able to connect to the ROUTER's socket."""
    path.chmod(0o666)


def level_plans(state: Path, uid: int, gid: int) -> dict[SandboxLevel, LaunchPlan]:
    """One plan per level, built with the arguments ``Confinement._plan`` passes."""
    return {
        level: plan_for_level(
            level,
            parent_pid=os.getpid(),
            uid=uid,
            gid=gid,
            read_paths=default_read_paths([str(PLUGINS)]),
            state_dir=str(state),
            network_granted=False,
            require=True,
        )
        for level in SandboxLevel
    }


async def run(rounds: int, workdir: Path, state: Path, uid: int, gid: int) -> dict[str, Any]:
    become_subreaper()
    reaper = ChildReaper()
    reaper.install(asyncio.get_running_loop())
    zygote: ZygoteSpawner | None = None
    cold: ZygoteSpawner | None = None
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{workdir / 'broker.sock'}"
    sock.bind(endpoint)
    share_socket(workdir / "broker.sock")
    features = probe_kernel()
    out = os.open(workdir / "workers.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    bench = Bench(reaper, sock, endpoint, out)
    try:
        t = time.perf_counter()
        zygote = await ZygoteSpawner.open(reaper, DAEMON_PRELOAD)
        zygote_start = time.perf_counter() - t
        cold = await ZygoteSpawner.open(reaper, DAEMON_PRELOAD, warm=0)
        exec_spawner = ExecSpawner()
        results: dict[str, Any] = {"zygote_start": zygote_start, "levels": {}}
        for mode, spawner in (("warm", zygote), ("cold", cold), ("exec", exec_spawner)):
            results[mode] = await bench.samples(spawner, rounds)
        for level, plan in level_plans(state, uid, gid).items():
            # the daemon's choice (processes.py): paranoid -> exec, else the zygote
            paranoid = level is SandboxLevel.PARANOID
            entry: dict[str, Any] = {
                "spawner": "exec" if paranoid else "zygote (warm)",
                "steps": sorted(plan.steps()),
                "missing": check_plan(plan, features),
            }
            if not entry["missing"]:
                spawner = exec_spawner if paranoid else zygote
                entry.update(await bench.samples(spawner, rounds, plan, str(state)))
            results["levels"][level.value] = entry
        return results
    except Exception:
        log = (workdir / "workers.log").read_text(errors="replace")[-3000:]
        print(f"spawn bench failed; worker output:\n{log}")
        raise
    finally:
        await bench.cleanup()
        for z in (zygote, cold):
            if z is not None:
                await z.aclose()
        os.close(out)
        sock.close(0)
        ctx.term()
        reaper.uninstall()
        become_subreaper(False)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], 30)
    uid, gid = resolve_user("stamp", PLUGIN_USER, None)
    with temp_dir() as workdir:
        state = state_dir(workdir, uid, gid)
        results = asyncio.run(run(args.rounds, workdir, state, uid, gid))
    rows = []
    for key, what in PHASES:
        w, c, e = (results[mode][key] for mode in ("warm", "cold", "exec"))
        rows.append([f"spawn -> {what}", *(ms(x[q]) for x in (w, c, e) for q in ("p50", "p99"))])
    level_rows = []
    for level, entry in results["levels"].items():
        if entry["missing"]:
            level_rows.append([level, entry["spawner"], "refused: " + "; ".join(entry["missing"])])
            continue
        cells = [ms(entry[key][q]) for key in ("hello", "ready") for q in ("p50", "p99")]
        level_rows.append([level, entry["spawner"], *cells])
    ready_p50 = results["warm"]["ready"]["p50"]
    ok = ready_p50 <= GOAL_ZYGOTE_READY
    text = "\n".join(
        [
            f"spawn: {args.rounds} rounds per mode after {WARMUP} warm-up, one worker at a time",
            f"percentiles: {PERCENTILE_METHOD}",
            f"zygote start-up (once, preloading {', '.join(DAEMON_PRELOAD)}, filling the "
            f"warm pool): {ms(results['zygote_start'])}",
            "",
            table(
                [
                    "phase",
                    "warm p50",
                    "warm p99",
                    "cold p50",
                    "cold p99",
                    "exec p50",
                    "exec p99",
                ],
                rows,
            ),
            "",
            f"goal zygote (warm) spawn -> answering (READY) p50 <= {ms(GOAL_ZYGOTE_READY)}: "
            f"{ms(ready_p50)} -> {verdict(ok)}",
            "",
            f"per sandbox level ({args.rounds} rounds each after {WARMUP} warm-up; the "
            f"daemon's plan and spawner, uid {PLUGIN_USER} from standard, no cgroups):",
            table(
                [
                    "level",
                    "spawner",
                    "spawn->HELLO p50",
                    "spawn->HELLO p99",
                    "spawn->READY p50",
                    "spawn->READY p99",
                ],
                level_rows,
            ),
        ]
    )
    data = {
        "machine": machine(),
        "percentiles": PERCENTILE_METHOD,
        "unit": "seconds from just before spawn()",
        "warmup": WARMUP,
        "goal": {f"zygote spawn -> READY p50 <= {GOAL_ZYGOTE_READY}s": ok},
        **results,
    }
    emit(text, data, args.json)


if __name__ == "__main__":
    run_main(main)
