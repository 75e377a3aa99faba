"""Spawn -> HELLO -> READY of a real worker process: zygote (warm pool / cold fork) vs exec.

The bench process plays the daemon's part, using the package's own pieces: it becomes a
child subreaper, installs a ``ChildReaper`` on its asyncio loop, binds a plain ROUTER on an
``ipc://`` endpoint and starts ``osk_daemon.worker.runtime:run_worker`` with a spec built
the way ``Instance.worker_spec`` builds it (daemon defaults, the ``benchplugins:Stamp``
plugin from ``bench/plugins``), through ``ZygoteSpawner`` (preloading what the daemon
preloads) with its default warm pool ("warm": a pre-forked child takes the request), through
a ``ZygoteSpawner`` with ``warm=0`` ("cold": a double fork per request) and through
``ExecSpawner``. Per round: ``t0`` just before ``spawn()``, then the
times ``spawn()`` returned the pid, the worker's HELLO arrived (runtime up, socket
connected) and its READY arrived (plugin imported and ``start()`` returned: the broker
would route calls to it from here). Then a STOP frame, and the exit is awaited through the
reaper (exit code 0 expected) before the next round, so rounds do not overlap.

    python bench/spawn.py [--json] [--rounds N]   # rounds per mode (default 30)
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
from osk_daemon.supervisor.instance import WORKER_TARGET
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus, become_subreaper
from osk_daemon.supervisor.spawner import ExecSpawner, Spawner, SpawnRequest, ZygoteSpawner

WARMUP = 3
DEADLINE = 15.0
GOAL_ZYGOTE_READY = 0.010
PHASES = (("pid", "spawn() returned the pid"), ("hello", "HELLO"), ("ready", "READY"))


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

    async def round(self, spawner: Spawner) -> dict[str, float]:
        token = secrets.token_hex(16)
        req = SpawnRequest(
            target=WORKER_TARGET,
            spec=worker_spec(self.endpoint, token),
            env=worker_env(),
            sys_path=(str(PLUGINS),),
            stdout=self.out,
            stderr=self.out,
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

    async def cleanup(self) -> None:
        for pid in self.live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.live.clear()


async def run(rounds: int, workdir: Path) -> dict[str, Any]:
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
    out = os.open(workdir / "workers.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    bench = Bench(reaper, sock, endpoint, out)
    try:
        t = time.perf_counter()
        zygote = await ZygoteSpawner.open(reaper)
        zygote_start = time.perf_counter() - t
        cold = await ZygoteSpawner.open(reaper, warm=0)
        results: dict[str, Any] = {"zygote_start": zygote_start}
        for mode, spawner in (("warm", zygote), ("cold", cold), ("exec", ExecSpawner())):
            samples = [await bench.round(spawner) for _ in range(WARMUP + rounds)][WARMUP:]
            stats = {key: summarize([s[key] for s in samples]) for key, _ in PHASES}
            results[mode] = {**stats, "rounds": samples}
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
    with temp_dir() as workdir:
        results = asyncio.run(run(args.rounds, workdir))
    rows = []
    for key, what in PHASES:
        w, c, e = (results[mode][key] for mode in ("warm", "cold", "exec"))
        rows.append([f"spawn -> {what}", *(ms(x[q]) for x in (w, c, e) for q in ("p50", "p99"))])
    ready_p50 = results["warm"]["ready"]["p50"]
    ok = ready_p50 <= GOAL_ZYGOTE_READY
    text = "\n".join(
        [
            f"spawn: {args.rounds} rounds per mode after {WARMUP} warm-up, one worker at a time",
            f"percentiles: {PERCENTILE_METHOD}",
            f"zygote start-up (once, preloading osk_daemon.worker.runtime, filling the warm "
            f"pool): {ms(results['zygote_start'])}",
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
