"""Real processes through both spawn paths: exact exit statuses, output, sessions, no zombies.

The test process makes itself a child subreaper (undone after each test) and installs a
``ChildReaper`` on the test's loop, like the daemon does. Targets live in ``spawn_targets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from osk_daemon.errors import OskInternalError, PluginLoadError
from osk_daemon.supervisor.output import MAX_LINE, LogLine, LogRing, OutputPipes
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus, become_subreaper
from osk_daemon.supervisor.sibling import sibling_fork_unavailable
from osk_daemon.supervisor.spawner import ExecSpawner, Spawner, SpawnRequest, ZygoteSpawner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[2]
TARGETS = "tests.integration.spawn_targets"
HOOKS = "tests.integration.warm_hooks"
DEADLINE = 10.0


@pytest.fixture
def subreaper() -> Iterator[None]:
    become_subreaper()
    try:
        yield
    finally:
        become_subreaper(False)


def _kill_leftover_children() -> list[int]:
    leftovers = [child.pid for child in psutil.Process().children()]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return leftovers


@pytest.fixture
async def reaper(subreaper: None) -> AsyncIterator[ChildReaper]:
    r = ChildReaper()
    r.install(asyncio.get_running_loop())
    try:
        yield r
    finally:
        r.uninstall()
        leftovers = _kill_leftover_children()
        assert leftovers == [], f"children left behind: {leftovers}"


@pytest.fixture
async def zygote(reaper: ChildReaper) -> AsyncIterator[ZygoteSpawner]:
    z = await ZygoteSpawner.open(reaper, (TARGETS, "json"), sys_path=[str(ROOT)])
    try:
        yield z
    finally:
        await z.aclose()


@pytest.fixture(params=["zygote", "zygote-cold", "zygote-cold-double-fork", "exec"])
async def spawner(
    request: pytest.FixtureRequest, reaper: ChildReaper, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Spawner]:
    s: Spawner
    if request.param == "zygote":
        s = await ZygoteSpawner.open(reaper, (TARGETS,), sys_path=[str(ROOT)])
    elif request.param.startswith("zygote-cold"):
        if request.param.endswith("double-fork"):  # the fallback without fork_sibling
            monkeypatch.setenv("OSK_ZYGOTE_DOUBLE_FORK", "1")
        s = await ZygoteSpawner.open(reaper, (TARGETS,), sys_path=[str(ROOT)], warm=0)
    else:
        s = ExecSpawner()
    try:
        yield s
    finally:
        await s.aclose()


@dataclass
class Run:
    pid: int
    exited: asyncio.Future[ExitStatus]
    pipes: OutputPipes
    ring: LogRing

    async def finish(self) -> tuple[ExitStatus, list[LogLine]]:
        async with asyncio.timeout(DEADLINE):
            status = await self.exited
            await self.pipes.wait_closed()
        return status, self.ring.tail()


async def start(
    spawner: Spawner, reaper: ChildReaper, func: str, spec: dict[str, Any], **kw: Any
) -> Run:
    loop = asyncio.get_running_loop()
    ring = LogRing(100)
    pipes = OutputPipes(loop, "test", 0, ring)
    req = SpawnRequest(
        target=func if ":" in func else f"{TARGETS}:{func}",
        spec=spec,
        sys_path=kw.pop("sys_path", (str(ROOT),)),
        stdout=pipes.stdout_w,
        stderr=pipes.stderr_w,
        **kw,
    )
    try:
        pid = await spawner.spawn(req)
    except BaseException:
        pipes.close()
        raise
    finally:
        os.close(pipes.stdout_w)
        os.close(pipes.stderr_w)
    exited: asyncio.Future[ExitStatus] = loop.create_future()
    reaper.watch(pid, exited.set_result)
    return Run(pid, exited, pipes, ring)


async def wait_line(ring: LogRing, queue: asyncio.Queue[LogLine], text: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not any(line.line == text for line in ring.tail()):
            await queue.get()


@pytest.mark.anyio
async def test_exit_code_and_output_streams(spawner: Spawner, reaper: ChildReaper) -> None:
    run = await start(spawner, reaper, "exit_with", {"code": 3, "tag": "x"})
    status, lines = await run.finish()
    assert status == ExitStatus(run.pid, 3, None)
    assert sorted((line.stream, line.line) for line in lines) == [
        ("stderr", "err x"),
        ("stdout", "out x"),
    ]


@pytest.mark.anyio
async def test_return_is_exit_zero_and_sigkill_is_signal_nine(
    spawner: Spawner, reaper: ChildReaper
) -> None:
    ok = await start(spawner, reaper, "return_normally", {})
    killed = await start(spawner, reaper, "kill_self", {})
    assert (await ok.finish())[0] == ExitStatus(ok.pid, 0, None)
    assert (await killed.finish())[0] == ExitStatus(killed.pid, None, signal.SIGKILL)


@pytest.mark.anyio
async def test_raising_target_exits_70_with_traceback(
    spawner: Spawner, reaper: ChildReaper
) -> None:
    run = await start(spawner, reaper, "raise_error", {"tag": "t1"})
    status, lines = await run.finish()
    assert status.code == 70
    stderr = [line.line for line in lines if line.stream == "stderr"]
    assert stderr[0] == "Traceback (most recent call last):"
    assert stderr[-1] == "RuntimeError: boom t1"


@pytest.mark.anyio
async def test_running_child_is_our_child_and_leads_its_session(
    spawner: Spawner, reaper: ChildReaper
) -> None:
    run = await start(spawner, reaper, "wait_for_stdin_eof_or_signal", {})
    # Guaranteed as soon as spawn() returns, before the target even runs:
    assert os.getsid(run.pid) == run.pid
    assert os.getpgid(run.pid) == run.pid
    queue = run.ring.subscribe()
    await wait_line(run.ring, queue, "running")
    run.ring.unsubscribe(queue)
    assert psutil.Process(run.pid).ppid() == os.getpid()
    os.killpg(run.pid, signal.SIGTERM)
    status, _ = await run.finish()
    assert status == ExitStatus(run.pid, None, signal.SIGTERM)


@pytest.mark.anyio
async def test_fifty_spawns_all_reported(spawner: Spawner, reaper: ChildReaper) -> None:
    runs = await asyncio.gather(
        *(start(spawner, reaper, "exit_with", {"code": i, "tag": i}) for i in range(50))
    )
    results = await asyncio.gather(*(run.finish() for run in runs))
    assert [status.code for status, _ in results] == list(range(50))
    assert all(len(lines) == 2 for _, lines in results)
    assert len({run.pid for run in runs}) == 50


@pytest.mark.anyio
async def test_env_cwd_sys_path_fds_and_signals(
    spawner: Spawner, reaper: ChildReaper, tmp_path: Path
) -> None:
    (tmp_path / "helper_module_for_sys_path.py").write_text("VALUE = 'from sys_path'\n")
    env = {"OSK_TEST_VAR": "hello", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    run = await start(
        spawner,
        reaper,
        "show_environment",
        {"var": "OSK_TEST_VAR"},
        env=env,
        cwd=str(tmp_path),
        sys_path=(str(tmp_path), str(ROOT)),
    )
    status, lines = await run.finish()
    out = dict(line.line.split(" ", 1) for line in lines if line.stream == "stdout")
    assert status.code == 0, [line.line for line in lines]
    assert out["env"] == "hello"
    # Exactly the given env (OSK_SPAWN_REQUEST is gone too); a fresh interpreter in the C
    # locale adds LC_CTYPE itself (PEP 538 locale coercion), as any ``python`` would.
    assert set(out["env_keys"].split(",")) - {"LC_CTYPE"} == {"OSK_TEST_VAR", "PATH"}
    assert out["cwd"] == str(tmp_path)
    assert out["path0"] == str(tmp_path)
    assert out["imported"] == "from sys_path"
    assert out["fds"] == "[0, 1, 2, 3]"  # 3 is the directory fd used to list /proc/self/fd
    assert (out["sigint"], out["sigpipe"], out["sid"]) == ("True", "True", "True")
    assert out["blocked"] == "[]"


@pytest.mark.anyio
async def test_empty_env_inherits_ours(spawner: Spawner, reaper: ChildReaper) -> None:
    os.environ["OSK_TEST_INHERITED"] = "yes"
    try:
        run = await start(spawner, reaper, "show_environment", {"var": "OSK_TEST_INHERITED"})
        _, lines = await run.finish()
    finally:
        del os.environ["OSK_TEST_INHERITED"]
    assert "env yes" in [line.line for line in lines]


@pytest.mark.anyio
@pytest.mark.parametrize("double_fork", [False, True], ids=["sibling-fork", "double-fork"])
async def test_zygote_is_single_threaded_and_only_child(
    reaper: ChildReaper,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    double_fork: bool,
) -> None:
    if double_fork:
        monkeypatch.setenv("OSK_ZYGOTE_DOUBLE_FORK", "1")
    elif unavailable := sibling_fork_unavailable():
        pytest.skip(f"no sibling fork here: {unavailable}")
    caplog.set_level("INFO", logger="osk.supervisor.spawner")
    zygote = await ZygoteSpawner.open(reaper, (TARGETS, "json"), sys_path=[str(ROOT)])
    try:
        await _single_threaded_and_only_child(zygote, reaper)
    finally:
        await zygote.aclose()
    said = "double-forks: OSK_ZYGOTE_DOUBLE_FORK is set"
    assert any(said in r.getMessage() for r in caplog.records) == double_fork


async def _single_threaded_and_only_child(zygote: ZygoteSpawner, reaper: ChildReaper) -> None:
    assert zygote.zygote_pid is not None
    # open() returns once the pool is full and the zygote idle: any middle processes are
    # reaped, the warm children are ours
    proc = psutil.Process(zygote.zygote_pid)
    assert len(zygote.warm_pids) == 2
    children = {child.pid for child in psutil.Process().children()}
    assert children == {zygote.zygote_pid, *zygote.warm_pids}
    assert proc.children() == []
    run = await start(zygote, reaper, "exit_with", {"code": 0})
    await run.finish()
    assert proc.num_threads() == 1
    await zygote.aclose()
    assert psutil.Process().children() == []
    cold = await ZygoteSpawner.open(reaper, ("json",), warm=0)
    try:
        assert cold.zygote_pid is not None and cold.warm_pids == frozenset()
        run = await start(cold, reaper, "exit_with", {"code": 0})
        await run.finish()
        assert [child.pid for child in psutil.Process().children()] == [cold.zygote_pid]
        assert psutil.Process(cold.zygote_pid).children() == []
    finally:
        await cold.aclose()


@pytest.mark.anyio
async def test_zygote_restarts_after_sigkill(zygote: ZygoteSpawner, reaper: ChildReaper) -> None:
    loop = asyncio.get_running_loop()
    for wait_for_death in (True, False):
        old = zygote.zygote_pid
        assert old is not None
        died: asyncio.Future[ExitStatus] = loop.create_future()
        reaper.watch(old, died.set_result)
        os.kill(old, signal.SIGKILL)
        if wait_for_death:
            async with asyncio.timeout(DEADLINE):
                assert (await died).signal == signal.SIGKILL
        # Served by a warm child that took it before it saw its zygote die, or by a new
        # zygote; once the death is known, the next spawn starts a new zygote first.
        run = await start(zygote, reaper, "exit_with", {"code": 5})
        assert (await run.finish())[0].code == 5
        async with asyncio.timeout(DEADLINE):
            await died
        run = await start(zygote, reaper, "exit_with", {"code": 6})
        assert (await run.finish())[0].code == 6
        assert zygote.zygote_pid not in (None, old)


@pytest.mark.anyio
async def test_zygote_reports_bad_request_as_plugin_load_error(
    zygote: ZygoteSpawner, reaper: ChildReaper
) -> None:
    sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        req = SpawnRequest("no_colon_here", {}, stdout=sink, stderr=sink)
        with pytest.raises(PluginLoadError, match="malformed spawn request"):
            await zygote.spawn(req)
    finally:
        os.close(sink)
    run = await start(zygote, reaper, "exit_with", {"code": 1})
    assert (await run.finish())[0].code == 1


@pytest.mark.anyio
async def test_zygote_needs_subreaper() -> None:
    r = ChildReaper()
    r.install(asyncio.get_running_loop())
    try:
        with pytest.raises(OskInternalError, match="subreaper"):
            await ZygoteSpawner.open(r, ("json",))
    finally:
        r.uninstall()


@pytest.mark.anyio
async def test_status_of_child_reaped_before_watch_is_delivered(reaper: ChildReaper) -> None:
    loop = asyncio.get_running_loop()
    sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        req = SpawnRequest(
            f"{TARGETS}:exit_with", {"code": 9}, sys_path=(str(ROOT),), stdout=sink, stderr=sink
        )
        pid = await ExecSpawner().spawn(req)
    finally:
        os.close(sink)
    pidfd = os.pidfd_open(pid)
    try:
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        try:
            async with asyncio.timeout(DEADLINE):
                await exited.wait()
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    reaper.reap()
    got: asyncio.Future[ExitStatus] = loop.create_future()
    reaper.watch(pid, got.set_result)
    async with asyncio.timeout(DEADLINE):
        assert await got == ExitStatus(pid, 9, None)


@pytest.mark.anyio
async def test_output_splits_long_lines_and_flushes_partial_ones() -> None:
    ring = LogRing(10)
    pipes = OutputPipes(asyncio.get_running_loop(), "p", 1, ring)
    queue = ring.subscribe()
    os.close(pipes.stderr_w)
    data = b"a\r\n" + "é".encode() * MAX_LINE + b"\ntail \xff"

    def write_all() -> None:  # more than a pipe holds: write while the loop reads
        with os.fdopen(pipes.stdout_w, "wb") as w:
            w.write(data)

    await asyncio.to_thread(write_all)
    async with asyncio.timeout(DEADLINE):
        await pipes.wait_closed()
    lines = [line.line for line in ring.tail()]
    assert lines[0] == "a"
    assert "".join(lines[1:-1]) == "é" * MAX_LINE
    assert all(len(line.encode()) <= MAX_LINE for line in lines)
    assert lines[-1] == "tail \ufffd"
    assert queue.qsize() == len(lines)
    assert {(line.plugin, line.instance, line.stream) for line in ring.tail()} == {
        ("p", 1, "stdout")
    }


@pytest.mark.anyio
async def test_log_ring_tail_and_bounded_subscribers() -> None:
    ring = LogRing(3, queue_size=2)
    queue = ring.subscribe()
    for i in range(5):
        ring.append(LogLine(0.0, "p", 0, "stdout", str(i)))
    assert [line.line for line in ring.tail()] == ["2", "3", "4"]
    assert [line.line for line in ring.tail(2)] == ["3", "4"]
    assert queue.qsize() == 2 and ring.dropped == 3
    ring.unsubscribe(queue)
    ring.append(LogLine(0.0, "p", 0, "stdout", "5"))
    assert queue.qsize() == 2


async def _exit_of(reaper: ChildReaper, pids: frozenset[int]) -> list[ExitStatus]:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[ExitStatus]] = []
    for pid in sorted(pids):
        fut: asyncio.Future[ExitStatus] = loop.create_future()
        reaper.watch(pid, fut.set_result)
        futures.append(fut)
    async with asyncio.timeout(DEADLINE):
        return await asyncio.gather(*futures)


@pytest.mark.anyio
async def test_warm_child_is_handed_out_as_our_child_and_session_leader(
    zygote: ZygoteSpawner, reaper: ChildReaper
) -> None:
    warm = zygote.warm_pids
    assert len(warm) == 2
    for pid in warm:
        assert psutil.Process(pid).ppid() == os.getpid()
        assert os.getsid(pid) == pid
    run = await start(zygote, reaper, "wait_for_stdin_eof_or_signal", {})
    assert run.pid in warm
    assert run.pid not in zygote.warm_pids
    assert zygote.spawn_counts == (1, 0)
    assert os.getsid(run.pid) == run.pid and os.getpgid(run.pid) == run.pid
    assert psutil.Process(run.pid).ppid() == os.getpid()
    queue = run.ring.subscribe()
    await wait_line(run.ring, queue, "running")
    os.killpg(run.pid, signal.SIGTERM)
    status, _ = await run.finish()
    assert status == ExitStatus(run.pid, None, signal.SIGTERM)


@pytest.mark.anyio
async def test_dead_warm_child_is_replaced_and_never_handed_out(
    zygote: ZygoteSpawner, reaper: ChildReaper
) -> None:
    victim = min(zygote.warm_pids)
    exited = asyncio.ensure_future(_exit_of(reaper, frozenset({victim})))
    os.kill(victim, signal.SIGKILL)
    assert (await exited)[0] == ExitStatus(victim, None, signal.SIGKILL)
    assert victim not in zygote.warm_pids
    pids = []
    for i in range(4):  # one at a time, each once the pool is full again
        async with asyncio.timeout(DEADLINE):
            await zygote.wait_warm(2)
        run = await start(zygote, reaper, "exit_with", {"code": i})
        pids.append(run.pid)
        assert (await run.finish())[0] == ExitStatus(run.pid, i, None)
    assert victim not in pids
    assert zygote.spawn_counts == (4, 0)


@pytest.mark.anyio
async def test_zygote_death_ends_warm_children_and_restart_refills(
    zygote: ZygoteSpawner, reaper: ChildReaper
) -> None:
    warm, old = zygote.warm_pids, zygote.zygote_pid
    assert len(warm) == 2 and old is not None
    exited = asyncio.ensure_future(_exit_of(reaper, warm | {old}))
    os.kill(old, signal.SIGKILL)
    statuses = {status.pid: status for status in await exited}
    assert statuses[old].signal == signal.SIGKILL
    assert all(statuses[pid] == ExitStatus(pid, 0, None) for pid in warm)
    assert zygote.warm_pids == frozenset()
    run = await start(zygote, reaper, "exit_with", {"code": 6})
    assert (await run.finish())[0].code == 6
    assert zygote.zygote_pid not in (None, old)
    assert zygote.spawn_counts == (1, 0)
    assert len(zygote.warm_pids) >= 1 and not zygote.warm_pids & warm


@pytest.mark.anyio
async def test_warm_up_hook_prepares_for_its_own_module_only(
    reaper: ChildReaper, tmp_path: Path
) -> None:
    (tmp_path / "helper_module_for_sys_path.py").write_text("VALUE = 'x'\n")
    z = await ZygoteSpawner.open(
        reaper, (TARGETS, HOOKS), sys_path=[str(ROOT)], warm_up=f"{HOOKS}:warm_up"
    )
    try:
        async with asyncio.timeout(DEADLINE):
            await z.wait_warm(2)
        run = await start(z, reaper, f"{HOOKS}:show_warm_up", {})
        status, lines = await run.finish()
        out = dict(line.line.split(" ", 1) for line in lines if line.stream == "stdout")
        assert status.code == 0 and out["pipe"] == "b'x'"  # made in this process, still open
        kept = [int(fd) for fd in out["kept"].strip("[]").split(",")]
        fds = [int(fd) for fd in out["fds"].strip("[]").split(",")]
        assert len(fds) == 6 and set(kept) < set(fds)  # 0-2, the pipe, the listing's own fd
        async with asyncio.timeout(DEADLINE):
            await z.wait_warm(1)
        run = await start(
            z, reaper, "show_environment", {"var": "PATH"}, sys_path=(str(tmp_path), str(ROOT))
        )
        status, lines = await run.finish()
        assert status.code == 0, [line.line for line in lines]
        assert "fds [0, 1, 2, 3]" in [line.line for line in lines]  # released for it
    finally:
        await z.aclose()


@pytest.mark.anyio
async def test_aclose_leaves_no_warm_child(reaper: ChildReaper) -> None:
    z = await ZygoteSpawner.open(reaper, (TARGETS,), sys_path=[str(ROOT)], warm=3)
    try:
        assert len(z.warm_pids) == 3
        runs = [await start(z, reaper, "exit_with", {"code": 0}) for _ in range(3)]
    finally:
        await z.aclose()  # right after the spawns: refills may still be on their way
    # only plugins may outlive aclose(): the zygote and every warm child are gone and reaped
    assert {child.pid for child in psutil.Process().children()} <= {run.pid for run in runs}
    assert z.warm_pids == frozenset()
    for run in runs:
        await run.finish()
    assert psutil.Process().children() == []


@pytest.mark.anyio
async def test_many_spawns_in_a_row(zygote: ZygoteSpawner, reaper: ChildReaper) -> None:
    # faster than the pool refills: warm while a warm child is ready, cold through the
    # zygote otherwise; every one is our child with its exact status either way
    pids = set()
    for i in range(40):
        run = await start(zygote, reaper, "exit_with", {"code": i % 7, "tag": i})
        status, lines = await run.finish()
        assert status == ExitStatus(run.pid, i % 7, None)
        assert sorted(line.line for line in lines) == [f"err {i}", f"out {i}"]
        pids.add(run.pid)
    assert len(pids) == 40
    warm, cold = zygote.spawn_counts
    assert warm + cold == 40 and warm >= 2
    assert len(zygote.warm_pids) <= 2
