"""From config + plugins directory to a start plan: versions, code folders, order, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from osk_daemon.config import load_config
from osk_daemon.errors import ConfigError
from osk_daemon.versioning.installed import scan
from osk_daemon.versioning.planning import StartPlan, plan_start

pytestmark = pytest.mark.timeout(10)


def install(root: Path, name: str, version: str, extra: str = "", folder: str = "") -> Path:
    where = root / name / (folder or version)
    where.mkdir(parents=True)
    (where / "osk-plugin.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nentry = "mod:P"\n{extra}'
    )
    return where


def req(name: str, rng: str, optional: bool = False) -> str:
    return f'[[requires]]\nname = "{name}"\nrange = "{rng}"\noptional = {str(optional).lower()}\n'


def plan(tmp_path: Path, body: str, plugins_dir: bool = True) -> StartPlan:
    head = '[daemon]\nplugins_dir = "installed"\n' if plugins_dir else ""
    (tmp_path / "osk.toml").write_text(head + body)
    return plan_start(load_config(tmp_path / "osk.toml"))


def error(tmp_path: Path, body: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, body)
    return info.value


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "installed"
    for v in ("2.5.1", "3.0.0", "3.1.0"):
        install(root, "store", v)
    install(root, "auth", "1.4.0", req("store", "~3.0"))
    install(root, "app", "1.0.0", req("auth", "^1") + req("metrics", "*", optional=True))
    install(root, "app", "2.0.0-rc.1", req("auth", "^1"))
    install(root, "metrics", "0.3.0", "offline_capable = true\n")
    return root


def test_ranges_pick_versions_and_pin_entry_and_code_folder(
    tmp_path: Path, installed: Path
) -> None:
    p = plan(tmp_path, '[plugins.app]\nversion = "^1"\n[plugins.store]\nversion = "<3.1"\n')
    versions = {name: cfg.version for name, cfg in p.config.plugins.items()}
    assert versions == {"app": "1.0.0", "store": "3.0.0", "auth": "1.4.0"}
    assert p.config.plugins["store"].path == [installed / "store" / "3.0.0"]
    assert p.config.plugins["app"].entry == "mod:P"
    assert p.pulled_in == ("auth",)
    assert p.waves == [["store"], ["auth"], ["app"]]
    assert p.requires["app"] == frozenset({"auth"})
    assert p.optional["app"] == frozenset()  # metrics is not chosen: the edge is dropped
    # the pulled-in plugin joins the root group; children follow the dependencies
    assert p.config.groups["root"].children == ["store", "auth", "app"]


def test_prereleases_only_when_the_range_opts_in(tmp_path: Path, installed: Path) -> None:
    p = plan(tmp_path, '[plugins.app]\nversion = ">=2.0.0-rc.0"\n')
    assert p.config.plugins["app"].version == "2.0.0-rc.1"
    p = plan(tmp_path, '[plugins.app]\nversion = "*"\n')
    assert p.config.plugins["app"].version == "1.0.0"


def test_optional_dependencies_in_the_config_are_ordered_first(
    tmp_path: Path, installed: Path
) -> None:
    p = plan(tmp_path, "[plugins.app]\n[plugins.metrics]\n")
    assert p.optional["app"] == frozenset({"metrics"})
    assert p.requires["app"] == frozenset({"auth"})
    assert p.offline_capable == frozenset({"metrics"})
    order = p.config.groups["root"].children
    assert order.index("metrics") < order.index("app")


def test_config_only_plugins_take_part_and_keep_their_entry(
    tmp_path: Path, installed: Path
) -> None:
    install(installed, "web", "1.0.0", req("cache", "^2"))
    body = '[plugins.web]\n[plugins.cache]\nentry = "c:C"\nversion = "2.2.0"\n'
    p = plan(tmp_path, body)
    assert p.config.plugins["cache"].entry == "c:C"
    assert p.config.plugins["cache"].version == "2.2.0"
    assert p.waves == [["cache"], ["web"]]
    body = '[plugins.web]\n[plugins.cache]\nentry = "c:C"\n'  # 0.0.0 does not fit ^2
    err = error(tmp_path, body)
    assert err.key == "plugins.web.version"
    assert "web 1.0.0 needs cache ^2" in err.reason


def test_groups_are_reordered_so_dependencies_start_first(tmp_path: Path, installed: Path) -> None:
    body = (
        "[plugins.auth]\n[plugins.store]\n[plugins.app]\n"
        '[groups.root]\nchildren = ["front", "back"]\n'
        '[groups.front]\nstrategy = "rest_for_one"\nchildren = ["app", "auth"]\n'
        '[groups.back]\nchildren = ["store"]\n'
    )
    p = plan(tmp_path, body)
    assert p.config.groups["front"].children == ["auth", "app"]
    assert p.config.groups["root"].children == ["back", "front"]
    assert p.warnings == ()


def test_groups_that_need_each_other_both_ways_keep_config_order(
    tmp_path: Path, installed: Path
) -> None:
    install(installed, "x", "1.0.0", req("store", "*"))
    body = (
        "[plugins.x]\n[plugins.store]\n[plugins.auth]\n"
        '[groups.root]\nchildren = ["one", "two"]\n'
        '[groups.one]\nchildren = ["x", "auth"]\n'  # x needs store (two)...
        '[groups.two]\nchildren = ["store"]\n'
    )
    p = plan(tmp_path, body)
    assert p.config.groups["root"].children == ["two", "one"]
    install(installed, "y", "1.0.0", req("auth", "*"))
    body = (
        "[plugins.x]\n[plugins.y]\n[plugins.store]\n[plugins.auth]\n"
        '[groups.root]\nchildren = ["one", "two"]\n'
        '[groups.one]\nchildren = ["x", "auth"]\n'  # x needs store (in two)
        '[groups.two]\nchildren = ["store", "y"]\n'  # y needs auth (in one)
    )
    p = plan(tmp_path, body)
    assert p.config.groups["root"].children == ["one", "two"]
    assert p.warnings and "need each other across groups" in p.warnings[0]


def test_a_conflict_names_the_plugin_and_explains(tmp_path: Path, installed: Path) -> None:
    install(installed, "old", "1.0.0", req("store", "^2"))
    err = error(tmp_path, "[plugins.old]\n[plugins.auth]\n")
    assert err.file == str(tmp_path / "osk.toml")
    assert err.reason.startswith("incompatible-versions: ")
    assert "no version of store satisfies both" in err.reason


def test_missing_plugin_and_bad_keys(tmp_path: Path, installed: Path) -> None:
    err = error(tmp_path, "[plugins.ghost]\n")
    assert err.key == "plugins.ghost.entry"
    assert "no osk-plugin.toml for 'ghost'" in err.reason
    err = error(tmp_path, '[plugins.ghost]\nentry = "g:G"\nversion = "^1"\n')
    assert err.key == "plugins.ghost.version"
    assert "is a range" in err.reason
    err = error(tmp_path, '[plugins.store]\nentry = "other:Thing"\n')
    assert err.key == "plugins.store.entry"
    assert "remove this key" in err.reason
    err = error(tmp_path, '[plugins.store]\nversion = "^9"\n')
    assert err.key == "plugins.store.version"
    assert "version-mismatch" in err.reason


def test_without_plugins_dir_a_range_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "osk.toml").write_text('[plugins.echo]\nentry = "e:E"\nversion = "^1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "osk.toml")
    assert info.value.key == "plugins.echo.version"
    assert "set daemon.plugins_dir" in info.value.reason


def test_scan_refuses_twins_and_bad_manifests(tmp_path: Path) -> None:
    root = tmp_path / "installed"
    install(root, "store", "1.0.0", folder="a")
    found = scan(root)
    assert list(found) == ["store"]
    install(root, "store", "1.0.0", folder="b")
    with pytest.raises(ConfigError, match="installed twice"):
        scan(root)
    with pytest.raises(ConfigError, match="no such directory"):
        scan(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    (bad / "p").mkdir(parents=True)
    (bad / "p" / "osk-plugin.toml").write_text('name = "p"\nversion = "one"\nentry = "m:P"\n')
    with pytest.raises(ConfigError) as info:
        scan(bad)
    assert info.value.key == "version"
