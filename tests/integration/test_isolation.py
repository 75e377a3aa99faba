"""Limits and sandboxes, hit for real through a running daemon.

Each test gives a plugin a limit or a sandbox level, makes it do the forbidden thing and
checks that the kernel refused it, that the daemon reported it, and that the daemon and
the host carry on. Skips say which kernel feature is missing.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osk_daemon.isolation.cgroups import Cgroups
from osk_daemon.isolation.plan import probe_kernel
from tests.integration.harness import (
    PLUGINS,
    ControlError,
    Daemon,
    daemon_config,
    leftover_cgroups,
    plugin_block,
    running_daemon,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FEATURES = probe_kernel()


def cgroups_or_skip() -> dict[str, bool]:
    """What the host's cgroups support (the probe's own subtree is removed again)."""
    try:
        cgroups = Cgroups.detect("osk-probe")
    except Exception as exc:
        pytest.skip(f"no usable cgroups here: {exc}")
    try:
        return cgroups.supports()
    finally:
        cgroups.close()


@pytest.fixture(scope="module")
def public_plugins() -> Iterator[Path]:
    """The test plugins where any uid can read them (the checkout may be in a 0700 home)."""
    path = Path(tempfile.mkdtemp(prefix="osk-plugins-"))
    path.chmod(0o755)
    shutil.copy(PLUGINS / "testplugins.py", path / "testplugins.py")
    (path / "testplugins.py").chmod(0o644)
    yield path
    shutil.rmtree(path)


def confined(plugins: Path, **options: Any) -> str:
    return daemon_config(
        plugin_block("box", entry="testplugins:Confined", plugins=plugins, **options)
    )


def events_of(d: Daemon, type_: str) -> list[dict[str, Any]]:
    return [e for e in d.ctl("events") if e["type"] == type_]


def test_memory_hog_is_oom_killed_inside_its_quota_and_restarted(public_plugins: Path) -> None:
    if not cgroups_or_skip().get("memory"):
        pytest.skip("no memory cgroup controller")
    with running_daemon(confined(public_plugins, limits={"memory": "64MiB"})) as d:
        old = d.row("box")["pid"]
        with pytest.raises(ControlError):
            d.call("box", "hog", {"mib": 512}, timeout=10)
        d.wait_until(
            lambda: d.row("box")["pid"] not in (old, None) and d.row("box")["state"] == "ready",
            what="the replacement after the OOM kill",
        )
        assert d.row("box")["last_exit"] == "oom"
        assert events_of(d, "plugin:oom")
        assert d.call("box", "echo", {"text": "alive"})["text"] == "alive"


def test_fork_bomb_stops_at_the_pids_limit(public_plugins: Path) -> None:
    if not cgroups_or_skip().get("pids"):
        pytest.skip("no pids cgroup controller")
    with running_daemon(confined(public_plugins, limits={"pids": 16})) as d:
        result = d.call("box", "fork_bomb", {"n": 200}, timeout=20)
        assert result["errno"] == errno.EAGAIN
        assert result["forked"] < 16
        d.wait_until(lambda: events_of(d, "plugin:limit"), what="the pids limit event")
        assert events_of(d, "plugin:limit")[0]["limit"] == "pids"
        assert d.row("box")["state"] == "ready"


def test_cpu_spinner_is_throttled(public_plugins: Path) -> None:
    if not cgroups_or_skip().get("cpu"):
        pytest.skip("no cpu cgroup controller")
    with running_daemon(confined(public_plugins, limits={"cpu": 0.1})) as d:
        d.call("box", "spin", {"seconds": 0.5}, timeout=10)
        d.wait_until(
            lambda: (d.row("box").get("cpu_throttled") or 0) > 0,
            what="the cgroup's throttling counter",
        )


def test_open_files_limit_gives_emfile(public_plugins: Path) -> None:
    with running_daemon(confined(public_plugins, limits={"open_files": 64})) as d:
        result = d.call("box", "open_many", {"n": 200})
        assert result["errno"] == errno.EMFILE
        assert result["opened"] < 64


def test_no_cgroup_is_left_behind(public_plugins: Path) -> None:
    cgroups_or_skip()
    with running_daemon(confined(public_plugins, limits={"pids": 64})) as d:
        pid = d.row("box")["pid"]
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        ours = [line.split(":", 2)[2] for line in lines if "box-0" in line]
        assert ours, lines
        mounts = [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
        dirs = [
            m / rel.lstrip("/")
            for m in [*mounts, Path("/sys/fs/cgroup")]
            for rel in ours
            if (m / rel.lstrip("/")).is_dir()
        ]
        assert dirs
    assert not [str(p) for p in dirs if p.exists()]
    assert not [str(p.parent) for p in dirs if p.parent.exists()]


def standard(plugins: Path, level: str = "standard", **sandbox: Any) -> str:
    return confined(plugins, sandbox={"level": level, "user": "nobody", **sandbox})


def needs(level: str) -> None:
    if FEATURES.landlock_abi < 1:
        pytest.skip("Landlock is not available on this kernel")
    if level in ("strict", "paranoid") and not FEATURES.libseccomp:
        pytest.skip("libseccomp is not available")
    if level == "paranoid" and not FEATURES.user_namespaces:
        pytest.skip("user namespaces are not available")


def test_standard_drops_privileges_and_confines_writes(
    tmp_path: Path, public_plugins: Path
) -> None:
    needs("standard")
    with running_daemon(standard(public_plugins)) as d:
        me = d.call("box", "whoami")
        assert me["Uid"].split()[0] == "65534"
        assert me["Gid"].split()[0] == "65534"
        assert me["Groups"] in ("", "65534")
        assert int(me["CapBnd"], 16) == 0
        assert int(me["CapEff"], 16) == 0
        assert me["NoNewPrivs"] == "1"
        # its own state dir is writable...
        assert d.call("box", "write", {"path": f"{me['cwd']}/ok.txt"}).endswith("ok.txt")
        # ...anything else is not, and the daemon hears of the attempt
        outside = tmp_path / "nope.txt"
        tmp_path.chmod(0o777)
        with pytest.raises(ControlError, match="Permission denied"):
            d.call("box", "write", {"path": str(outside)})
        assert not outside.exists()
        d.wait_until(lambda: events_of(d, "sandbox:violation"), what="the violation event")


def test_strict_refuses_network_and_ptrace(public_plugins: Path) -> None:
    needs("strict")
    with running_daemon(standard(public_plugins, "strict")) as d:
        me = d.call("box", "whoami")
        assert me["Seccomp"] == "2"
        with pytest.raises(ControlError) as err:
            d.call("box", "connect", {"host": "127.0.0.1", "port": 22})
        assert "unreachable" in str(err.value) or "not permitted" in str(err.value)
        with pytest.raises(ControlError, match="not permitted"):
            d.call("box", "ptrace")
        # the handler failed with seccomp's EPERM: the SDK reported it to the daemon
        ptrace_violations = d.wait_until(
            lambda: [
                e
                for e in events_of(d, "sandbox:violation")
                if e.get("detail", "").startswith("ptrace:")
            ],
            what="the ptrace violation event",
        )
        assert ptrace_violations[0]["pluginName"] == "box"
        assert "Operation not permitted" in ptrace_violations[0]["detail"]
        assert d.row("box")["state"] == "ready"


def test_paranoid_runs_in_a_user_namespace_with_an_allow_list(public_plugins: Path) -> None:
    needs("paranoid")
    with running_daemon(standard(public_plugins, "paranoid")) as d:
        me = d.call("box", "whoami")
        assert me["uid_map"].split() != ["0", "0", "4294967295"]
        assert me["Seccomp"] == "2"
        with pytest.raises(ControlError, match=r"not permitted|unreachable"):
            d.call("box", "connect", {"host": "127.0.0.1", "port": 22})
        assert d.call("box", "echo", {"text": "still works"})["text"] == "still works"


def start_refused(tmp_path: Path, body: str) -> str:
    """Run the daemon on ``body``; it must refuse to start (exit 2). Returns its stderr."""
    cfg = tmp_path / "osk.toml"
    cfg.write_text(body)
    proc = subprocess.run(
        [sys.executable, "-m", "osk_daemon.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert not leftover_cgroups(tmp_path / "run")
    return proc.stderr


@pytest.mark.parametrize("require", [True, False])
def test_unknown_user_is_refused_at_start_whatever_require_says(
    tmp_path: Path, require: bool
) -> None:
    sandbox = {"level": "standard", "user": "no-such-user-xyz", "require": require}
    stderr = start_refused(tmp_path, daemon_config(plugin_block("box", sandbox=sandbox)))
    assert f"{tmp_path / 'osk.toml'}: plugins.box.sandbox.user: no such user" in stderr
    assert "no-such-user-xyz" in stderr


def test_limit_the_host_cannot_enforce_is_refused_when_required(tmp_path: Path) -> None:
    body = daemon_config(plugin_block("box", limits={"memory": "64MiB"}), cgroups=False)
    stderr = start_refused(tmp_path, body)
    assert "plugins.box.sandbox: cannot be enforced on this host" in stderr
    assert "limits.memory" in stderr


def test_require_false_runs_degraded_and_status_says_what_is_not_enforced() -> None:
    """cgroups off plus a memory limit: the limit cannot be enforced, the plugin runs."""
    box = plugin_block("box", limits={"memory": "64MiB"}, sandbox={"require": False})
    body = daemon_config(box + plugin_block("full"), cgroups=False)
    with running_daemon(body) as d:
        row = d.row("box")
        assert row["state"] == "ready"
        assert d.call("box", "echo", {"text": "degraded"})["text"] == "degraded"
        assert row["sandbox_degraded"] == [
            "limits.memory: needs the memory cgroup controller (cgroups are off)"
        ]
        assert d.row("full")["sandbox_degraded"] == []
        assert "sandbox degraded: box: running degraded" in d.log.read_text()
