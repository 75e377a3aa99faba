"""Config reload (oskctl reload, SIGHUP) and run-time load/unload, on real daemons."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.harness import (
    ControlError,
    Daemon,
    daemon_config,
    plugin_block,
    running_daemon,
)
from tests.integration.test_rollouts import Load, install_counter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def pids(d: Daemon) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for row in d.status():
        out.setdefault(row["plugin"], set()).add(row["pid"])
    return out


def config(installed: Path, counter_version: str, extra: str) -> str:
    return daemon_config(
        f"""
        [plugins.counter]
        version = "{counter_version}"
        [plugins.counter.health_check]
        interval = 0.2
        timeout = 0.2
        """
        + extra,
        plugins_dir=str(installed),
    )


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "installed"
    install_counter(root, "1.0.0")
    install_counter(root, "2.0.0")
    root.chmod(0o755)
    return root


def test_reload_applies_each_kind_of_change_and_keeps_untouched_pids(installed: Path) -> None:
    before = (
        plugin_block("keep")
        + plugin_block("gone")
        + plugin_block("tuned", health_check={"interval": 1.0, "timeout": 0.5})
        + plugin_block("wide", instances=1)
    )
    with running_daemon(config(installed, "1.0.0", before)) as d:
        old = pids(d)
        after = (
            plugin_block("keep")
            + plugin_block("tuned", health_check={"interval": 0.3, "timeout": 0.2})
            + plugin_block("wide", instances=2)
            + plugin_block("newbie")
        )
        d.config.write_text(config(installed, "2.0.0", after))
        summary = d.ctl("reload")
        assert summary["added"] == ["newbie"]
        assert summary["removed"] == ["gone"]
        assert summary["swapped"] == ["counter"]
        assert summary["scaled"] == ["wide"]
        assert summary["retuned"] == ["tuned"]
        assert "keep" in summary["unchanged"]

        def settled() -> bool:
            rows = d.status()
            names = {r["plugin"] for r in rows}
            counter = {r["version"] for r in rows if r["plugin"] == "counter"}
            wide = [r for r in rows if r["plugin"] == "wide"]
            return (
                "gone" not in names
                and counter == {"2.0.0"}
                and len(wide) == 2
                and all(r["state"] == "ready" for r in rows)
            )

        d.wait_until(settled, timeout=60, what="reload applied")
        now = pids(d)
        assert now["keep"] == old["keep"]  # untouched: same process
        assert now["tuned"] == old["tuned"]  # retuned in place: same process
        assert old["wide"] <= now["wide"]  # scaled up: the first instance kept
        assert now["counter"].isdisjoint(old["counter"])  # swapped: new processes
        assert d.call("newbie", "echo", {"text": "hi"})["text"] == "hi"
        with pytest.raises(ControlError) as info:
            d.call("gone", "echo", {"text": "x"})
        assert info.value.code == "unavailable"


def test_an_invalid_config_is_refused_and_the_running_one_stays(installed: Path) -> None:
    with running_daemon(config(installed, "1.0.0", plugin_block("keep"))) as d:
        old = pids(d)
        good = d.config.read_text()
        d.config.write_text(good + "\n[plugins.keep.health_check]\ninterval = -1\n")
        with pytest.raises(ControlError) as info:
            d.ctl("reload")
        message = str(info.value)
        assert "the running config stays" in message
        assert "osk.toml: plugins.keep.health_check.interval: must be > 0, got -1" in message
        d.config.write_text(good.replace('version = "1.0.0"', 'version = "^9"'))
        with pytest.raises(ControlError, match="version-mismatch"):
            d.ctl("reload")
        d.config.write_text(good.replace('runtime_dir = "run"', 'runtime_dir = "other"'))
        with pytest.raises(ControlError) as info:
            d.ctl("reload")
        assert "daemon.runtime_dir" in str(info.value)
        assert "cannot change while the daemon runs" in str(info.value)
        assert pids(d) == old
        assert d.call("keep", "echo", {"text": "still"})["text"] == "still"


def test_sighup_reloads(installed: Path) -> None:
    with running_daemon(config(installed, "1.0.0", plugin_block("keep"))) as d:
        assert d.proc is not None
        d.config.write_text(config(installed, "1.0.0", plugin_block("keep") + plugin_block("hup")))
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_until(
            lambda: any(r["plugin"] == "hup" and r["state"] == "ready" for r in d.status()),
            what="the plugin added by SIGHUP",
        )
        events = [e["type"] for e in d.ctl("events", lines=1000)]
        assert "kernel:reloaded" in events


def test_load_and_unload_at_run_time(installed: Path, tmp_path: Path) -> None:
    extra = tmp_path / "reporter"
    extra.mkdir()
    (extra / "reporter_plugin.py").write_text(
        "from osk_daemon.worker import Plugin, rpc\n\n\n"
        "class Reporter(Plugin):\n"
        "    @rpc\n"
        "    async def report(self) -> dict:\n"
        '        return await self.ctx.call("counter", "get")\n'
    )
    (extra / "osk-plugin.toml").write_text(
        'name = "reporter"\nversion = "0.1.0"\nentry = "reporter_plugin:Reporter"\n'
        '[[requires]]\nname = "counter"\nrange = "^1"\n'
    )
    extra.chmod(0o755)
    with running_daemon(config(installed, "1.0.0", "")) as d:
        loaded = d.ctl("load", path=str(extra))
        assert loaded["plugin"] == "reporter"
        d.wait_until(
            lambda: any(r["plugin"] == "reporter" and r["state"] == "ready" for r in d.status()),
            what="reporter loaded",
        )
        assert d.call("reporter", "report")["version"] == "1.0.0"
        with pytest.raises(ControlError, match="runs already"):
            d.ctl("load", path=str(extra))
        with pytest.raises(ControlError, match="reporter requires 'counter'"):
            d.ctl("unload", name="counter")
        done = d.ctl("unload", name="counter", strategy="drain", dependents="cascade")
        assert done["unloaded"] == ["reporter", "counter"]
        assert d.status() == []
        with pytest.raises(ControlError, match="no plugin named 'counter'"):
            d.ctl("unload", name="counter")
        loaded = d.ctl("load", path=str(installed / "counter" / "2.0.0"))
        d.wait_until(lambda: [r["state"] for r in d.status()] == ["ready"], what="counter back")
        d.ctl("unload", name="counter", strategy="forceful")
        assert d.status() == []


def test_hot_reload_swaps_to_the_edited_code_and_keeps_state(tmp_path: Path) -> None:
    code = tmp_path / "live"
    code.mkdir()
    source = (
        "from osk_daemon.worker import Plugin, rpc\n\n"
        'GREETING = "{greeting}"\n\n\n'
        "class Live(Plugin):\n"
        "    async def start(self) -> None:\n"
        '        self.count = getattr(self, "count", 0)\n\n'
        "    @rpc\n"
        "    def hello(self) -> list:\n"
        "        self.count += 1\n"
        "        return [GREETING, self.count]\n\n"
        "    async def export_state(self) -> int:\n"
        "        return self.count\n\n"
        "    async def import_state(self, state: int) -> None:\n"
        "        self.count = state\n"
    )
    (code / "live_plugin.py").write_text(source.format(greeting="hello"))
    code.chmod(0o755)
    body = plugin_block(
        "live", entry="live_plugin:Live", plugins=code, watch=["*.py"], watch_debounce=0.05
    )
    with running_daemon(daemon_config(body)) as d:
        assert d.call("live", "hello") == ["hello", 1]
        assert d.call("live", "hello") == ["hello", 2]
        old_pid = d.row("live")["pid"]
        (code / "live_plugin.py").write_text(source.format(greeting="bonjour"))
        d.wait_until(
            lambda: (
                d.ctl("rollout", action="status") != []
                and d.ctl("rollout", action="status")[0]["state"] == "succeeded"
            ),
            what="the hot reload swap",
        )
        assert d.call("live", "hello") == ["bonjour", 3]  # new code, state carried
        rows = d.status("live")
        assert len(rows) == 1
        assert rows[0]["pid"] != old_pid
        changed = [e for e in d.ctl("events", lines=1000) if e["type"] == "plugin:code-changed"]
        assert changed and changed[0]["files"] == ["live_plugin.py"]


def test_newer_versions_are_listed_or_deployed_by_update_mode(installed: Path) -> None:
    body = daemon_config(
        """
        [plugins.counter]
        version = "^1"
        [plugins.counter.update]
        mode = "manual"
        [plugins.auto]
        version = "^1"
        [plugins.auto.update]
        mode = "auto"
        window = "00:00-23:59"
        [plugins.auto.rollout]
        drain_timeout = 2.0
        """,
        plugins_dir=str(installed),
    )
    auto = installed / "auto" / "1.0.0"
    auto.mkdir(parents=True)
    for name in ("counter_plugin.py",):
        (auto / name).write_text((installed / "counter" / "1.0.0" / name).read_text())
    (auto / "osk-plugin.toml").write_text(
        'name = "auto"\nversion = "1.0.0"\nentry = "counter_plugin:Counter"\n'
    )
    with running_daemon(body) as d:
        assert d.ctl("updates") == []
        install_counter(installed, "1.1.0")  # arrives while the daemon runs
        newer = installed / "auto" / "1.1.0"
        newer.mkdir()
        (newer / "counter_plugin.py").write_text(
            (installed / "counter" / "1.1.0" / "counter_plugin.py").read_text()
        )
        (newer / "osk-plugin.toml").write_text(
            'name = "auto"\nversion = "1.1.0"\nentry = "counter_plugin:Counter"\n'
        )
        d.wait_until(
            lambda: (
                {r["plugin"]: r["version"] for r in d.status()}.get("auto") == "1.1.0"
                and len(d.status("auto")) == 1
            ),
            timeout=60,
            what="auto updated to 1.1.0",
        )
        listed = {r["plugin"]: r for r in d.ctl("updates")}
        assert listed["counter"]["available"] == "1.1.0"
        assert listed["counter"]["mode"] == "manual"
        assert "auto" not in listed  # it runs the newest already
        assert {r["version"] for r in d.status("counter")} == {"1.0.0"}  # manual: untouched


def test_a_reload_applies_the_files_edit_and_keeps_what_was_set_at_run_time(
    installed: Path, tmp_path: Path
) -> None:
    # a deploy, a newer version inside the range (manual updates), a plugin loaded at run
    # time: none of them is the file's edit, so a reload that adds a plugin keeps them all
    body = config(installed, "^1", '[plugins.counter.update]\nmode = "manual"\n')
    with running_daemon(body) as d:
        extra = tmp_path / "extra"
        extra.mkdir()
        (extra / "x.py").write_text(
            "from osk_daemon.worker import Plugin\n\n\nclass X(Plugin):\n    pass\n"
        )
        (extra / "osk-plugin.toml").write_text('name = "extra"\nversion = "0.1.0"\nentry = "x:X"\n')
        extra.chmod(0o755)
        d.ctl("load", path=str(extra))
        d.ctl("deploy", plugin="counter", version="2.0.0", strategy="rolling")
        d.wait_until(
            lambda: (
                [(r["version"], r["state"]) for r in d.status("counter")] == [("2.0.0", "ready")]
            ),
            what="deployed 2.0.0",
        )
        install_counter(installed, "1.1.0")  # newer inside ^1: listed, not deployed
        before = pids(d)
        d.config.write_text(
            config(
                installed,
                "^1",
                '[plugins.counter.update]\nmode = "manual"\n' + plugin_block("newbie"),
            )
        )
        summary = d.ctl("reload")
        assert summary["added"] == ["newbie"]
        assert summary["swapped"] == [] and summary["removed"] == []
        after = pids(d)
        assert after["counter"] == before["counter"] and after["extra"] == before["extra"]
        assert [r["version"] for r in d.status("counter")] == ["2.0.0"]
        # an edit of counter's own entry applies, on the version that runs
        edited = '[plugins.counter.update]\nmode = "manual"\n[plugins.counter.config]\nx = 1\n'
        d.config.write_text(config(installed, "^1", edited + plugin_block("newbie")))
        assert d.ctl("reload")["swapped"] == ["counter"]
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "succeeded",
            what="the swap",
        )
        assert [r["version"] for r in d.status("counter")] == ["2.0.0"]
        assert d.status("counter")[0]["pid"] not in before["counter"]
        assert pids(d)["extra"] == before["extra"]


def test_a_watcher_follows_the_config_a_reload_gives(tmp_path: Path) -> None:
    code = tmp_path / "w"
    code.mkdir()
    (code / "w_plugin.py").write_text(
        "from osk_daemon.worker import Plugin, rpc\n\n\nclass W(Plugin):\n"
        "    @rpc\n    def v(self) -> int:\n        return 1\n"
    )
    code.chmod(0o755)
    plain = plugin_block("w", entry="w_plugin:W", plugins=code)
    watched = plugin_block(
        "w", entry="w_plugin:W", plugins=code, watch=["*.py"], watch_debounce=0.05
    )
    with running_daemon(daemon_config(plain)) as d:
        d.config.write_text(daemon_config(watched))
        assert d.ctl("reload")["retuned"] == ["w"]  # watch alone: no restart
        d.wait_until(lambda: d.status("w")[0]["state"] == "ready", what="w ready")
        edited = (code / "w_plugin.py").read_text().replace("1", "2")

        def seen() -> bool:  # the watcher starts as the reload ends: edit until it saw one
            events = d.ctl("events", lines=1000)
            if not any(e["type"] == "plugin:code-changed" for e in events):
                (code / "w_plugin.py").write_text(edited)
                return False
            return True

        d.wait_until(seen, timeout=30, what="the watcher saw the edit")
        d.wait_until(lambda: d.call("w", "v") == 2, timeout=30, what="the hot reload")
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="w")["state"] == "succeeded",
            what="the swap's end",
        )

        # unloaded, its watcher goes: a later edit touches nothing and the daemon runs on
        def code_changes() -> int:
            return sum(e["type"] == "plugin:code-changed" for e in d.ctl("events", lines=1000))

        swaps = code_changes()
        d.ctl("unload", name="w")
        (code / "w_plugin.py").write_text((code / "w_plugin.py").read_text().replace("2", "3"))
        d.config.write_text(daemon_config(""))
        d.ctl("reload")  # the daemon answers: it did not fall over the edit
        assert d.status() == []
        assert code_changes() == swaps  # the edit after the unload started no swap


def test_a_reload_scales_down_without_failing_a_call(installed: Path) -> None:
    # the instances a reload removes are drained first: their calls in flight finish,
    # new calls go to the ones that stay
    three = config(installed, "1.0.0", "").replace(
        "[plugins.counter.health", "instances = 3\n[plugins.counter.health", 1
    )
    with running_daemon(three) as d, Load(d) as load:
        d.wait_until(lambda: load.ok >= 100, what="load flowing")
        d.config.write_text(config(installed, "1.0.0", ""))
        assert d.ctl("reload")["scaled"] == ["counter"]
        assert len(d.status("counter")) == 1
        mark = load.ok
        d.wait_until(lambda: load.ok >= mark + 100, what="load after the scale-down")
        drained = [e for e in d.ctl("events", lines=1000) if e["type"] == "plugin:destroyed"]
        assert len(drained) == 2
    assert load.failed == []


def test_a_reload_or_unload_that_would_cut_into_a_rollout_is_refused_whole(
    installed: Path,
) -> None:
    with running_daemon(config(installed, "1.0.0", plugin_block("other"))) as d:
        d.ctl("deploy", plugin="counter", version="2.0.0", strategy="ab")
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "serving",
            what="A/B serving",
        )
        before = pids(d)
        d.config.write_text(daemon_config(plugin_block("newbie"), plugins_dir=str(installed)))
        with pytest.raises(ControlError, match=r"a rollout of 'counter' to 2\.0\.0 is serving"):
            d.ctl("reload")
        assert pids(d) == before  # nothing of it applied: other runs, newbie does not
        with pytest.raises(ControlError, match="cannot unload counter: a rollout"):
            d.ctl("unload", name="counter")
        # a supervision setting alone would retune every instance, the new ones too
        retuned = config(installed, "1.0.0", plugin_block("other")).replace(
            "interval = 0.2", "interval = 0.3"
        )
        d.config.write_text(retuned)
        with pytest.raises(ControlError, match="cannot reload: a rollout of 'counter'"):
            d.ctl("reload")
        with pytest.raises(ControlError, match=r"a rollout of 'counter' to 2\.0\.0"):
            d.ctl("deploy", plugin="counter", version="2.0.0")
        assert pids(d) == before
        d.config.write_text(daemon_config(plugin_block("newbie"), plugins_dir=str(installed)))
        d.ctl("rollout", action="abort", plugin="counter")
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "rolled-back",
            what="aborted",
        )
        summary = d.ctl("reload")
        assert summary["added"] == ["newbie"] and sorted(summary["removed"]) == ["counter", "other"]


def test_a_plugin_kept_as_it_runs_follows_the_plan_where_a_changed_one_needs_it(
    tmp_path: Path,
) -> None:
    # app 2 needs lib ^2; the edit moves app to ^2 and leaves lib's entry as it was: lib
    # must move too, or app 2.0.0 would run against lib 1.0.0
    root = tmp_path / "installed"
    for name, version, needs in (
        ("lib", "1.0.0", ""),
        ("lib", "2.0.0", ""),
        ("app", "1.0.0", "lib ^1"),
        ("app", "2.0.0", "lib ^2"),
    ):
        folder = root / name / version
        folder.mkdir(parents=True)
        (folder / "p.py").write_text(
            "from osk_daemon.worker import Plugin\n\n\nclass P(Plugin):\n    pass\n"
        )
        requires = ""
        if needs:
            dep, rng = needs.split()
            requires = f'[[requires]]\nname = "{dep}"\nrange = "{rng}"\n'
        (folder / "osk-plugin.toml").write_text(
            f'name = "{name}"\nversion = "{version}"\nentry = "p:P"\n{requires}'
        )
    root.chmod(0o755)

    def body(app: str) -> str:
        return daemon_config(
            f'[plugins.app]\nversion = "{app}"\n[plugins.lib]\nversion = "*"\n',
            plugins_dir=str(root),
        )

    with running_daemon(body("^1")) as d:
        assert {r["plugin"]: r["version"] for r in d.status()} == {"app": "1.0.0", "lib": "1.0.0"}
        d.config.write_text(body("^2"))
        assert sorted(d.ctl("reload")["swapped"]) == ["app", "lib"]
        d.wait_until(
            lambda: (
                {(r["plugin"], r["version"], r["state"]) for r in d.status()}
                == {("app", "2.0.0", "ready"), ("lib", "2.0.0", "ready")}
            ),
            timeout=60,
            what="both on 2.0.0",
        )
