"""Versions, start order and graceful degradation, observed on real daemons.

Each test installs a small plugins directory (several versions of a few plugins, each
version's code saying its own version) and runs a daemon on it. Order is read from the
daemon's event stream, which records each publish in sequence: a dependent's
``plugin:before-init`` must come after its dependency's first good health verdict.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import ControlError, Daemon, daemon_config, running_daemon

OSKCTL = [sys.executable, "-m", "osk_daemon.control.oskctl"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PLUGIN_CODE = """
from osk_daemon.worker import Plugin, rpc

VERSION = "{version}"


class P(Plugin):
    async def start(self) -> None:
        self.seen: list[list[str]] = []
        if self.ctx.config.get("fail_start"):
            raise RuntimeError("refusing to start, as configured")

    @rpc
    def version(self) -> str:
        return VERSION

    @rpc
    def down(self) -> list[str]:
        return sorted(self.ctx.dependencies_down)

    @rpc
    def seen_events(self) -> list[list[str]]:
        return self.seen

    async def dependency_down(self, name: str, optional: bool) -> None:
        self.seen.append(["down", name])

    async def dependency_up(self, name: str, optional: bool) -> None:
        self.seen.append(["up", name])
"""


def install(root: Path, name: str, version: str, manifest_extra: str = "") -> None:
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "verplug.py").write_text(PLUGIN_CODE.format(version=version))
    (folder / "osk-plugin.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nentry = "verplug:P"\n'
        + textwrap.dedent(manifest_extra)
    )


def requires(*reqs: tuple[str, str] | tuple[str, str, bool]) -> str:
    out = ""
    for req in reqs:
        out += f'[[requires]]\nname = "{req[0]}"\nrange = "{req[1]}"\n'
        if len(req) == 3:
            out += f"optional = {'true' if req[2] else 'false'}\n"
    return out


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    """store 2.5.1 / 3.1.0 / 4.0.0; auth 1.4.0 (store ~3.1); app 1.0.0 and 1.2.0."""
    root = tmp_path / "installed"
    for v in ("2.5.1", "3.1.0", "4.0.0"):
        install(root, "store", v)
    install(root, "auth", "1.4.0", requires(("store", "~3.1")))
    install(root, "app", "1.0.0", requires(("auth", "^1"), ("store", ">=2")))
    install(root, "app", "1.2.0", requires(("auth", "^1"), ("store", "^3 || ^4")))
    install(root, "cache", "1.0.0", "offline_capable = true\n" + requires(("store", "*")))
    root.chmod(0o755)
    return root


def order_of(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["type"], e.get("pluginName", ""), str(e.get("health", ""))) for e in events]


def first(seq: list[tuple[str, str, str]], item: tuple[str, str, str]) -> int:
    return seq.index(item)


def test_versions_are_chosen_and_plugins_start_after_what_they_need(catalogue: Path) -> None:
    config = daemon_config(
        """
        [plugins.app]
        version = "^1"
        [plugins.auth]
        """,
        plugins_dir=str(catalogue),
    )
    with running_daemon(config) as d:
        versions = {r["plugin"]: r["version"] for r in d.status()}
        # store is pulled in by auth and app; ~3.1 and ^3 || ^4 leave only 3.1.0
        assert versions == {"app": "1.2.0", "auth": "1.4.0", "store": "3.1.0"}
        # each instance runs exactly its version's code
        assert d.call("store", "version") == "3.1.0"
        assert d.call("app", "version") == "1.2.0"
        seq = order_of(d.ctl("events", lines=1000))
        store_healthy = first(seq, ("plugin:health", "store", "healthy"))
        auth_healthy = first(seq, ("plugin:health", "auth", "healthy"))
        assert first(seq, ("plugin:before-init", "auth", "")) > store_healthy
        assert first(seq, ("plugin:before-init", "app", "")) > auth_healthy
        assert ("plugin:waiting", "app", "") in seq
        graph = d.ctl("graph")
        assert graph["waves"] == [["store"], ["auth"], ["app"]]
        app = next(p for p in graph["plugins"] if p["name"] == "app")
        assert app["requires"] == ["auth", "store"]
        assert app["version"] == "1.2.0"
        # oskctl prints it for people and for Graphviz
        dot = subprocess.run(
            [*OSKCTL, "--socket", str(d.socket), "graph", "--dot"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert '"app" -> "auth"' in dot
        assert dot.lstrip().startswith("digraph")
        # stopped in reverse: dependents first
        seq = order_of(events_until_exit(d))
        assert d.proc is not None
        assert d.proc.wait(30) == 0
        destroyed = [name for kind, name, _ in seq if kind == "plugin:destroyed"]
        assert destroyed == ["app", "auth", "store"]


def events_until_exit(d: Daemon) -> list[dict[str, Any]]:
    """SIGTERM the daemon and collect the events it streams until its socket closes."""
    assert d.proc is not None
    items = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(d.socket))
        sock.sendall(b'{"cmd": "events", "args": {"follow": true, "lines": 0}}\n')
        d.proc.send_signal(signal.SIGTERM)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
    for line in buf.splitlines():
        message = json.loads(line)
        if "stream" in message:
            items.append(message["stream"])
    return items


def test_a_conflict_is_explained_by_check_config(tmp_path: Path) -> None:
    root = tmp_path / "installed"
    install(root, "store", "2.5.0")
    install(root, "store", "3.2.0")
    install(root, "echo", "2.3.0", requires(("store", "^3.0")))
    install(root, "auth", "1.4.0", requires(("store", "~2.5")))
    config = tmp_path / "osk.toml"
    config.write_text(
        f'[daemon]\nplugins_dir = "{root}"\n[plugins.echo]\nversion = "^2"\n[plugins.auth]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "osk_daemon.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "incompatible-versions" in done.stderr
    assert "needs store ^3.0" in done.stderr
    assert "needs store ~2.5" in done.stderr
    assert "no version of store satisfies both" in done.stderr


def test_a_dependency_going_down_degrades_and_recovers(catalogue: Path) -> None:
    config = daemon_config(
        """
        [plugins.store]
        version = "3.1.0"
        [plugins.auth]
        [plugins.cache]
        """,
        plugins_dir=str(catalogue),
    )
    with running_daemon(config) as d:
        assert d.row("auth")["health"] == "healthy"
        d.ctl("stop", name="store")

        def degraded() -> bool:
            return d.row("auth")["degraded_by"] == ["store"] and ["down", "store"] in d.call(
                "cache", "seen_events"
            )

        d.wait_until(degraded, what="auth degraded by store")
        auth = d.row("auth")
        assert auth["health"] == "degraded"
        assert "store" in auth["detail"]
        assert d.call("auth", "down") == ["store"]
        cache = d.row("cache")  # offline_capable: told, but keeps serving as healthy
        assert (cache["health"], cache["degraded_by"]) == ("healthy", [])
        with pytest.raises(ControlError) as info:
            d.call("store", "version")
        assert info.value.code == "unavailable"
        d.ctl("start", name="store")
        d.wait_until(lambda: d.row("auth")["degraded_by"] == [], what="auth recovered")
        assert d.row("auth")["health"] == "healthy"
        assert d.call("auth", "down") == []
        # the hook runs in its own task in the plugin: told means told, eventually
        d.wait_until(
            lambda: d.call("auth", "seen_events") == [["down", "store"], ["up", "store"]],
            what="auth's dependency_up hook ran",
        )


def test_a_crashed_dependency_is_reported_down_then_up(catalogue: Path) -> None:
    config = daemon_config(
        """
        [plugins.store]
        version = "3.1.0"
        [plugins.auth]
        """,
        plugins_dir=str(catalogue),
    )
    with running_daemon(config) as d:
        pid = d.row("store")["pid"]
        os.kill(pid, signal.SIGKILL)

        def told_both() -> bool:
            return d.call("auth", "seen_events") == [["down", "store"], ["up", "store"]]

        d.wait_until(told_both, what="auth told store went down and came back")
        seq = order_of(d.ctl("events", lines=1000))
        assert ("plugin:dependency-down", "auth", "") in seq
        assert ("plugin:dependency-up", "auth", "") in seq
        assert d.row("store")["pid"] != pid


def test_a_critical_plugin_failing_to_start_rolls_the_boot_back(catalogue: Path) -> None:
    config = daemon_config(
        """
        [plugins.store]
        version = "3.1.0"
        [plugins.auth]
        critical = true
        config = { fail_start = true }
        """,
        plugins_dir=str(catalogue),
        rollback_on_failure=True,
    )
    with running_daemon(config, wait_ready=False) as d:
        assert d.proc is not None
        code = d.proc.wait(timeout=60)
        log = d.log.read_text()
        assert code == 1, log
        assert "boot failed: critical plugin auth/0 failed to start" in log
        assert "rolled back: store" in log
