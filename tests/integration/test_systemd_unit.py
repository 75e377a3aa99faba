"""The shipped systemd unit: ``systemd-analyze verify`` is clean, the offline security review
scores it at most 3.0, every check it fails is explained in the unit, and the daemon with
sandboxed plugins really runs under the unit's seccomp ceiling.

systemd is not PID 1 here, so the unit is never started; ``systemd-analyze`` works offline.
``verify`` insists that ExecStart's binary exists, and the unit names where it is installed
(/opt/osk), not where the tests run: the tests check a copy whose ExecStart points at this
venv's ``osk-daemon``, the only line that differs.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from osk_daemon.isolation.plan import probe_kernel
from tests.integration.harness import (
    PLUGINS,
    ControlError,
    daemon_config,
    plugin_block,
    running_daemon,
)

SYSTEMD = Path(__file__).parents[2] / "systemd"
UNIT = SYSTEMD / "osk-daemon.service"
NETWORK = SYSTEMD / "drop-ins" / "network.conf"
INSTALLED_EXEC = "ExecStart=/opt/osk/bin/osk-daemon "
ANALYZE = shutil.which("systemd-analyze")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (systemd)"),
]


def unit_copy(where: Path, *drop_ins: Path) -> Path:
    """The unit in ``where`` with ExecStart at this venv's osk-daemon (and ``drop_ins`` in
    its .d directory, where systemd-analyze picks them up)."""
    text = UNIT.read_text()
    assert text.count(INSTALLED_EXEC) == 1
    exe = Path(sys.executable).parent / "osk-daemon"
    assert exe.is_file(), f"{exe} missing: install the project into the venv"
    unit = where / UNIT.name
    unit.write_text(text.replace(INSTALLED_EXEC, f"ExecStart={exe} "))
    for drop_in in drop_ins:
        (where / f"{UNIT.name}.d").mkdir(exist_ok=True)
        shutil.copy(drop_in, where / f"{UNIT.name}.d" / drop_in.name)
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "--no-pager", *args], capture_output=True, text=True, timeout=60, check=False
    )


def exposure(unit: Path) -> tuple[float, list[str]]:
    """The overall exposure and the names of the failed checks (the lines marked ✗)."""
    out = analyze("security", "--offline=true", str(unit))
    assert out.returncode == 0, out.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert found, out.stdout
    failed = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("✗")]
    return float(found.group(1)), failed


def test_verify_is_clean(tmp_path: Path) -> None:
    out = analyze("verify", str(unit_copy(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (out.stdout + out.stderr).strip() == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a missing binary and an unknown key are both reported."""
    unit = unit_copy(tmp_path)
    unit.write_text(
        unit.read_text()
        .replace("ExecStart=/", "ExecStart=/nonexistent/")
        .replace("KillMode=process", "KillMode=process\nNoSuchKey=1")
    )
    out = analyze("verify", str(unit))
    assert out.returncode != 0
    assert "is not executable" in out.stderr
    assert "NoSuchKey" in out.stderr


def test_security_exposure_is_at_most_3_and_every_failed_check_is_explained(
    tmp_path: Path,
) -> None:
    score, failed = exposure(unit_copy(tmp_path))
    assert score <= 3.0, failed
    comments = "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))
    for check in failed:  # e.g. "ProtectProc=", "CapabilityBoundingSet=~CAP_KILL"
        directive = check.split("=")[0].split("/")[0]
        assert directive in comments, f"{check} fails and the unit does not say why"


def test_the_network_drop_in_opens_the_network_and_still_verifies(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    base, _ = exposure(unit_copy(tmp_path / "base"))
    unit = unit_copy(tmp_path, NETWORK)
    out = analyze("verify", str(unit))
    assert out.returncode == 0, out.stdout + out.stderr
    score, failed = exposure(unit)
    assert "PrivateNetwork=" in failed
    assert "RestrictAddressFamilies=~AF_(INET|INET6)" in failed
    assert base < score <= 4.0


def test_the_unit_declares_what_the_daemon_relies_on() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "KillMode": ["process"],
        "Delegate": ["yes"],
        "Restart": ["on-failure"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "RuntimeDirectory": ["osk"],
        "StateDirectory": ["osk"],
        "RuntimeDirectoryPreserve": ["restart"],
    }
    assert {key: settings.get(key) for key in expected} == expected
    assert settings["ExecStart"] == ["/opt/osk/bin/osk-daemon run --config /etc/osk/osk.toml"]
    assert settings["WatchdogSec"]


# ---- the daemon under the unit's ceiling ---------------------------------------------------

_CEILING = '''
"""Test only: this process and everything it starts run under a seccomp filter and MDWE
like those of the osk-daemon unit (imported at interpreter start, from PYTHONPATH)."""
import ctypes, os

if os.environ.get("OSK_TEST_CEILING") and not os.environ.get("OSK_TEST_CEILING_ON"):
    os.environ["OSK_TEST_CEILING_ON"] = "1"  # children inherit the filter: apply it once
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ERRNO, ALLOW, EQ, NE = 0x00050000, 0x7FFF0000, 4, 1
    # default: SystemCallErrorNumber=EPERM
    ctx = ctypes.c_void_p(lib.seccomp_init(ctypes.c_uint32(ERRNO | 1)))
    socket_nr = lib.seccomp_syscall_resolve_name(b"socket")
    with open(os.environ["OSK_TEST_CEILING"]) as f:
        for name in f.read().split():
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr >= 0 and nr != socket_nr:
                lib.seccomp_rule_add(ctx, ctypes.c_uint32(ALLOW), nr, 0)
    # RestrictAddressFamilies=AF_UNIX: other families fail with EAFNOSUPPORT
    lib.seccomp_rule_add(ctx, ctypes.c_uint32(ALLOW), socket_nr, 1, Cmp(0, EQ, 1, 0))
    lib.seccomp_rule_add(ctx, ctypes.c_uint32(ERRNO | 97), socket_nr, 1, Cmp(0, NE, 1, 0))
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load")
'''


@functools.cache
def _group(name: str) -> frozenset[str]:
    """A syscall group of this systemd, nested groups expanded."""
    out = analyze("syscall-filter", name)
    assert out.returncode == 0, out.stderr
    names: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= _group(item) if item.startswith("@") else {item}
    return frozenset(names)


def unit_syscalls() -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow."""
    allowed: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            deny = value.startswith("~")
            names: set[str] = set()
            for item in value.lstrip("~").split():
                names |= _group(item) if item.startswith("@") else {item}
            allowed = allowed - names if deny else allowed | names
    return allowed


@pytest.fixture
def ceiling() -> Iterator[dict[str, str]]:
    """The environment that puts a daemon under the unit's ceiling (see _CEILING)."""
    features = probe_kernel()
    if not (features.libseccomp and features.landlock_abi >= 1 and features.user_namespaces):
        pytest.skip("needs libseccomp, Landlock and user namespaces")
    where = Path(tempfile.mkdtemp(prefix="osk-ceiling-"))
    where.chmod(0o755)  # plugins of uid nobody import sitecustomize and the test plugins
    (where / "sitecustomize.py").write_text(_CEILING)
    (where / "syscalls.txt").write_text("\n".join(sorted(unit_syscalls())))
    shutil.copy(PLUGINS / "testplugins.py", where / "testplugins.py")
    for path in where.iterdir():
        path.chmod(0o644)
    yield {"PYTHONPATH": str(where), "OSK_TEST_CEILING": str(where / "syscalls.txt")}
    shutil.rmtree(where)


def test_the_daemon_and_its_sandboxes_work_under_the_units_seccomp_ceiling(
    ceiling: dict[str, str],
) -> None:
    plugins = Path(ceiling["PYTHONPATH"])

    def box(name: str, **options: object) -> str:
        return plugin_block(name, entry="testplugins:Confined", plugins=plugins, **options)

    config = daemon_config(
        box("strict", sandbox={"level": "strict", "user": "nobody"})
        + box("paranoid", sandbox={"level": "paranoid", "user": "nobody"})
        + box("plain", spawn="exec")
    )
    with running_daemon(config, env=ceiling) as d:
        assert d.proc is not None
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "the ceiling is not on"
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        # the unit's address families hold for a plugin without a sandbox of its own
        with pytest.raises(ControlError, match="Address family not supported"):
            d.call("plain", "connect")
        for name in ("strict", "paranoid"):  # built inside the ceiling: uid, Landlock, seccomp
            me = d.call(name, "whoami")
            assert me["Uid"].split()[0] == "65534"
            assert me["Seccomp"] == "2"
            assert d.call(name, "echo", {"text": name})["text"] == name
        d.ctl("reload")
        d.ctl("restart", name="paranoid")
        assert d.call("paranoid", "echo", {"text": "again"})["text"] == "again"
