"""The launch sequence for real: each scenario runs in a forked child that confines itself.

The child applies the plan, tries the forbidden (and the allowed) things, and reports the
outcomes as JSON through a pipe before ``os._exit``; the test process itself is never
restricted. Everything the child needs is imported here, before the fork: after the drop to
uid 65534 the interpreter's stdlib under /root may be unreadable.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from osk_daemon.isolation.plan import (
    KernelFeatures,
    LaunchPlan,
    SandboxError,
    SandboxLevel,
    default_read_paths,
    plan_for_level,
)
from osk_daemon.isolation.privileges import PR_GET_PDEATHSIG, get_pdeathsig
from osk_daemon.isolation.probe import libc, probe_kernel
from osk_daemon.isolation.seccomp import ALLOW_SYSCALLS, DENY_SYSCALLS
from osk_daemon.isolation.sequence import apply_in_child

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOBODY = 65534
FEATURES = probe_kernel()
IS_ROOT = os.geteuid() == 0
PR_SET_CHILD_SUBREAPER = 36
assert PR_GET_PDEATHSIG == 2  # imported so the child never needs a lazy import

needs_root = pytest.mark.skipif(not IS_ROOT, reason="the privilege drop needs root")
needs_landlock = pytest.mark.skipif(FEATURES.landlock_abi == 0, reason="no Landlock here")
needs_seccomp = pytest.mark.skipif(
    not (FEATURES.seccomp and FEATURES.libseccomp), reason="no seccomp filter / libseccomp"
)
needs_ns = pytest.mark.skipif(
    not (FEATURES.user_namespaces and FEATURES.net_namespaces), reason="no user/net namespaces"
)


def run_in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; the child runs ``body`` and sends its result (or its exception) back as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = {"ok": True, **body()}
        except BaseException as exc:
            result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        try:
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as pipe:
        while chunk := pipe.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    data: dict[str, Any] = json.loads(b"".join(chunks) or b'{"ok": false, "error": "silent"}')
    return data


def status_fields() -> dict[str, str]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def attempt(fn: Callable[[], object]) -> str:
    """ "ok", or the errno name an OSError carried."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def libc_errno(rc: int) -> str:
    return "ok" if rc != -1 else errno.errorcode[ctypes.get_errno()]


def ptrace_traceme() -> str:
    return libc_errno(libc().ptrace(0, 0, None, None))


def mount_tmpfs(target: str) -> str:
    return libc_errno(libc().mount(b"none", target.encode(), b"tmpfs", 0, None))


@pytest.fixture
def box() -> Iterator[Path]:
    """A directory uid 65534 can reach: ``state/`` (the plugin's state dir, with ``mine.txt``
    owned by 65534), ``rw/`` (an extra write path) and ``outside.txt``."""
    root = Path(tempfile.mkdtemp(prefix="osk-sbx-"))
    root.chmod(0o755)
    for sub in ("state", "rw"):
        (root / sub).mkdir(mode=0o777)
        (root / sub).chmod(0o777)
    (root / "state" / "mine.txt").write_text("mine")
    os.chown(root / "state" / "mine.txt", NOBODY, NOBODY)
    (root / "rw" / "data.txt").write_text("inside")
    (root / "rw" / "data.txt").chmod(0o666)
    (root / "outside.txt").write_text("outside")
    (root / "outside.txt").chmod(0o666)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def confined(level: SandboxLevel, box: Path, **kw: Any) -> LaunchPlan:
    return plan_for_level(
        level,
        parent_pid=os.getpid(),
        uid=NOBODY,
        gid=NOBODY,
        read_paths=default_read_paths([]),
        state_dir=str(box / "state"),
        write_paths=(str(box / "rw"),),
        **kw,
    )


# ---- minimal -------------------------------------------------------------------------


def test_minimal_sets_no_new_privs_and_pdeathsig() -> None:
    plan = plan_for_level(SandboxLevel.MINIMAL, parent_pid=os.getpid())

    def body() -> dict[str, Any]:
        skipped = apply_in_child(plan)
        return {"skipped": skipped, "nnp": status_fields()["NoNewPrivs"], "pds": get_pdeathsig()}

    out = run_in_child(body)
    assert out == {"ok": True, "skipped": [], "nnp": "1", "pds": int(signal.SIGKILL)}


def test_pdeathsig_waits_for_reparenting_and_kills_with_the_parent() -> None:
    """A (subreaper) > B > C: B exits at once; C sets PDEATHSIG only once A is its parent."""

    def a_body() -> dict[str, Any]:
        libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        a_pid = os.getpid()
        r, w = os.pipe()
        block_r, block_w = os.pipe()
        b = os.fork()
        if b == 0:
            if os.fork() == 0:
                skipped = apply_in_child(plan_for_level(SandboxLevel.MINIMAL, parent_pid=a_pid))
                report = [os.getpid(), os.getppid(), get_pdeathsig(), skipped]
                os.write(w, json.dumps(report).encode())  # one small write: atomic
                os.read(block_r, 1)  # blocks until A kills it
                os._exit(3)
            os._exit(0)  # B exits at once: C is reparented to A (the subreaper)
        os.close(w)
        os.waitpid(b, 0)
        c_pid, ppid, pds, skipped = json.loads(os.read(r, 4096))
        os.kill(c_pid, signal.SIGTERM)
        os.waitpid(c_pid, 0)
        os.close(block_w)
        return {"ppid_is_a": ppid == a_pid, "pds": pds, "skipped": skipped}

    out = run_in_child(a_body)
    assert out["ok"], out
    assert out["ppid_is_a"] is True
    assert out["pds"] == int(signal.SIGKILL)
    assert out["skipped"] == []


def test_pdeathsig_fires_when_the_parent_exits() -> None:
    def a_body() -> dict[str, Any]:
        libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        ready_r, ready_w = os.pipe()
        block_r, _block_w = os.pipe()  # never written: the read blocks until the signal
        b = os.fork()
        if b == 0:
            b_pid = os.getpid()
            c = os.fork()
            if c == 0:
                apply_in_child(plan_for_level(SandboxLevel.MINIMAL, parent_pid=b_pid))
                os.write(ready_w, str(os.getpid()).encode())
                os.read(block_r, 1)  # blocks until the parent-death signal
                os._exit(3)
            c_pid = int(os.read(ready_r, 64))
            os.write(ready_w, str(c_pid).encode())
            os._exit(0)
        os.close(block_r)
        os.waitpid(b, 0)
        c_pid = int(os.read(ready_r, 64))
        pidfd = os.pidfd_open(c_pid)
        readable, _, _ = select.select([pidfd], [], [], 20)
        if not readable:
            os.kill(c_pid, signal.SIGKILL)
        _, status = os.waitpid(c_pid, 0)
        return {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}

    out = run_in_child(a_body)
    assert out == {"ok": True, "signal": int(signal.SIGKILL)}


# ---- standard ------------------------------------------------------------------------


@needs_root
@needs_landlock
def test_standard_drops_privileges_and_confines_the_filesystem(box: Path) -> None:
    plan = confined(SandboxLevel.STANDARD, box)

    def body() -> dict[str, Any]:
        skipped = apply_in_child(plan)
        st = status_fields()
        rw = box / "rw"
        return {
            "skipped": skipped,
            "ids": [os.getresuid(), os.getresgid()],
            "groups": st["Groups"],
            "caps": [st["CapBnd"], st["CapEff"], st["CapPrm"]],
            "write_outside": attempt(lambda: (box / "outside.txt").write_text("x")),
            "read_outside": attempt((box / "outside.txt").read_text),
            "read_etc_hostname": attempt(lambda: Path("/etc/hostname").read_text()),
            "write_inside": attempt(lambda: (rw / "new.txt").write_text("x")),
            "read_inside": (rw / "data.txt").read_text(),
            "read_usr": attempt(lambda: Path("/usr/lib/os-release").read_text()),
            "dev_null": attempt(lambda: Path("/dev/null").write_text("x")),
        }

    out = run_in_child(body)
    assert out["ok"], out
    assert out["skipped"] == []
    assert out["ids"] == [[NOBODY] * 3, [NOBODY] * 3]
    assert out["groups"] in ("", str(NOBODY))
    assert out["caps"] == ["0000000000000000"] * 3
    assert out["write_outside"] == "EACCES"
    assert out["read_outside"] == "EACCES"
    assert out["read_etc_hostname"] == "EACCES"
    assert out["write_inside"] == "ok"
    assert out["read_inside"] == "inside"
    assert out["read_usr"] == "ok"
    assert out["dev_null"] == "ok"


# ---- strict --------------------------------------------------------------------------


@needs_root
@needs_landlock
@needs_seccomp
def test_strict_denies_ptrace_mount_and_inet_but_not_unix(box: Path) -> None:
    plan = confined(SandboxLevel.STRICT, box)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(box / "daemon.sock")
    listener.bind(path)
    Path(path).chmod(0o777)
    listener.listen(1)

    def body() -> dict[str, Any]:
        parent_net = str(Path("/proc/self/ns/net").readlink())
        skipped = apply_in_child(plan)

        def inet() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.connect(("127.0.0.1", 22))

        def unix() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(b"hello")

        return {
            "skipped": skipped,
            "own_netns": str(Path("/proc/self/ns/net").readlink()) != parent_net,
            "seccomp": status_fields()["Seccomp"],
            "ptrace": ptrace_traceme(),
            "mount": mount_tmpfs(str(box / "rw")),
            "inet": attempt(inet),
            "unix": attempt(unix),
            "unshare": libc_errno(libc().unshare(0x40000000)),
        }

    try:
        out = run_in_child(body)
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(16) == b"hello"
    finally:
        listener.close()
    assert out["ok"], out
    assert out["skipped"] == []
    assert out["own_netns"] is True
    assert out["seccomp"] == "2"
    assert out["ptrace"] == "EPERM"
    assert out["mount"] == "EPERM"
    assert out["inet"] in ("EPERM", "ENETUNREACH")
    assert out["unix"] == "ok"
    assert out["unshare"] == "EPERM"


# ---- paranoid ------------------------------------------------------------------------


@needs_root
@needs_landlock
@needs_seccomp
@needs_ns
def test_paranoid_user_namespace_allow_list_and_python_still_works(box: Path) -> None:
    plan = confined(SandboxLevel.PARANOID, box)
    endpoint = f"ipc://{box}/zmq.sock"

    async def zmq_ping() -> bytes:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.connect(endpoint)
            await sock.send(b"ping")
            reply: bytes = await asyncio.wait_for(sock.recv(), 20)
            return reply
        finally:
            sock.close(linger=0)
            ctx.term()

    def body() -> dict[str, Any]:
        skipped = apply_in_child(plan)
        st = status_fields()
        return {
            "skipped": skipped,
            "uid_map": Path("/proc/self/uid_map").read_text().split(),
            "uid": os.getuid(),
            "seccomp": st["Seccomp"],
            "caps": [st["CapBnd"], st["CapEff"], st["CapPrm"]],
            "ptrace": ptrace_traceme(),
            "mount": mount_tmpfs(str(box / "rw")),
            "inet": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
            "read": (box / "rw" / "data.txt").read_text(),
            "write_extra": attempt(lambda: (box / "rw" / "p.txt").write_text("p")),
            "write_state": attempt(lambda: (box / "state" / "p.txt").write_text("p")),
            "read_outside": attempt((box / "outside.txt").read_text),
            "zmq": asyncio.run(zmq_ping()).decode(),
        }

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        try:
            result = {"ok": True, **body()}
        except BaseException as exc:
            result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    try:
        router.bind(endpoint)
        Path(f"{box}/zmq.sock").chmod(0o777)
        if router.poll(20_000):
            ident, msg = router.recv_multipart()
            router.send_multipart([ident, b"pong" if msg == b"ping" else b"?"])
        with os.fdopen(r, "rb") as pipe:
            out = json.loads(pipe.read() or b'{"ok": false}')
        _, status = os.waitpid(pid, 0)
    finally:
        router.close(linger=0)
        ctx.term()
    assert out["ok"], out
    assert out["skipped"] == []
    assert out["uid_map"] == [str(NOBODY), str(NOBODY), "1"]
    assert out["uid"] == NOBODY
    assert out["seccomp"] == "2"
    assert out["caps"] == ["0000000000000000"] * 3
    assert out["ptrace"] == "EPERM"
    assert out["mount"] == "EPERM"
    assert out["inet"] == "EPERM"
    assert out["read"] == "inside"  # filesystem.write paths stay readable...
    assert out["write_extra"] == "EACCES"  # ...but only the state dir is writable
    assert out["write_state"] == "ok"
    assert out["read_outside"] == "EACCES"
    assert out["zmq"] == "pong"
    assert os.waitstatus_to_exitcode(status) == 0


@needs_root
@needs_landlock
@needs_seccomp
@needs_ns
@pytest.mark.parametrize(
    ("level", "want"), [(SandboxLevel.STRICT, "ok"), (SandboxLevel.PARANOID, "EPERM")]
)
def test_allow_list_refuses_what_the_deny_list_lets_through(
    box: Path, level: SandboxLevel, want: str
) -> None:
    """fchown is in neither list: the deny-list lets it through, the allow-list does not.

    ``fchown(fd, -1, -1)`` on the plugin's own file changes nothing and cannot fail for lack
    of permission, so an EPERM can only come from the filter.
    """
    assert "fchown" not in DENY_SYSCALLS and "fchown" not in ALLOW_SYSCALLS
    plan = confined(level, box)
    mine = box / "state" / "mine.txt"

    def body() -> dict[str, Any]:
        skipped = apply_in_child(plan)
        fd = os.open(mine, os.O_RDONLY)
        try:
            result = attempt(lambda: os.fchown(fd, -1, -1))
        finally:
            os.close(fd)
        return {"skipped": skipped, "fchown": result, "getpid": os.getpid() > 0}

    out = run_in_child(body)
    assert out == {"ok": True, "skipped": [], "fchown": want, "getpid": True}


# ---- rlimits -------------------------------------------------------------------------


def test_rlimits_nofile_fsize_core(box: Path) -> None:
    limits = (("NOFILE", 32, 32), ("FSIZE", 4096, 4096), ("CORE", 0, 0))
    plan = plan_for_level(SandboxLevel.NONE, rlimits=limits)

    def body() -> dict[str, Any]:
        skipped = apply_in_child(plan)
        fds: list[int] = []
        nofile = "ok"
        try:
            for _ in range(64):
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            nofile = errno.errorcode[exc.errno or 0]
        for fd in fds:
            os.close(fd)
        big = attempt(lambda: (box / "rw" / "big.bin").write_bytes(b"x" * 10_000))
        return {
            "skipped": skipped,
            "nofile": nofile,
            "fsize": big,
            "core": resource.getrlimit(resource.RLIMIT_CORE),
            "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        }

    out = run_in_child(body)
    assert out == {
        "ok": True,
        "skipped": [],
        "nofile": "EMFILE",
        "fsize": "EFBIG",
        "core": [0, 0],
        "nofile_limit": [32, 32],
    }


def test_rlimit_above_the_hard_limit_is_clamped() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard + 1000 if hard != resource.RLIM_INFINITY else 1 << 20
    plan = plan_for_level(SandboxLevel.NONE, rlimits=(("NOFILE", want, want),))

    def body() -> dict[str, Any]:
        apply_in_child(plan)
        return {"limit": resource.getrlimit(resource.RLIMIT_NOFILE)}

    out = run_in_child(body)
    assert out["ok"], out
    assert out["limit"][1] <= (hard if hard != resource.RLIM_INFINITY else want)


# ---- degraded and refused --------------------------------------------------------------

POOR = KernelFeatures(
    landlock_abi=0,
    seccomp=False,
    libseccomp=False,
    user_namespaces=False,
    net_namespaces=False,
    no_new_privs=True,
)


@needs_root
def test_require_false_skips_what_the_kernel_lacks(box: Path) -> None:
    plan = confined(SandboxLevel.PARANOID, box, require=False)

    def body() -> dict[str, Any]:
        skipped = apply_in_child(plan, features=POOR)
        st = status_fields()
        return {
            "steps": sorted(s.split(":", 1)[0] for s in skipped),
            "uid": os.getuid(),
            "seccomp": st["Seccomp"],
            "nnp": st["NoNewPrivs"],
            "read_outside": attempt((box / "outside.txt").read_text),
        }

    out = run_in_child(body)
    assert out["ok"], out
    assert out["steps"] == ["landlock", "net_namespace", "seccomp", "user_namespace"]
    assert out["uid"] == NOBODY
    assert out["seccomp"] == "0"
    assert out["nnp"] == "1"
    assert out["read_outside"] == "ok"


def test_require_true_refuses_before_changing_anything(box: Path) -> None:
    plan = confined(SandboxLevel.STRICT, box)

    def body() -> dict[str, Any]:
        try:
            apply_in_child(plan, features=POOR)
        except SandboxError as exc:
            return {"refused": str(exc), "code": exc.code, "uid": os.getuid()}
        return {"refused": None}

    out = run_in_child(body)
    assert out["ok"], out
    assert "landlock" in out["refused"]
    assert out["code"] == "sandbox"
    assert out["uid"] == os.getuid()
