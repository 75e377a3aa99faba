"""Diffing a running config against a reloaded one: which plugins start, stop, swap, scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from osk_daemon.config import load_config
from osk_daemon.config.diff import ConfigDiff, diff_configs

pytestmark = pytest.mark.timeout(10)

BASE = """
[daemon]
runtime_dir = "run"
[plugins.echo]
entry = "e:E"
version = "1.0.0"
[plugins.counter]
entry = "c:C"
instances = 2
[plugins.crasher]
entry = "x:X"
[plugins.crasher.health_check]
interval = 1.0
"""


def diff(tmp_path: Path, old: str, new: str) -> ConfigDiff:
    (tmp_path / "old.toml").write_text(old)
    (tmp_path / "new.toml").write_text(new)
    return diff_configs(load_config(tmp_path / "old.toml"), load_config(tmp_path / "new.toml"))


def test_an_identical_config_changes_nothing(tmp_path: Path) -> None:
    d = diff(tmp_path, BASE, BASE)
    assert d.empty
    assert d.unchanged == ("echo", "counter", "crasher")


def test_added_removed_swapped_scaled_retuned(tmp_path: Path) -> None:
    new = (
        BASE.replace('version = "1.0.0"', 'version = "1.1.0"')
        .replace("instances = 2", "instances = 3")
        .replace("interval = 1.0", "interval = 0.5")
        .replace('[plugins.crasher]\nentry = "x:X"', '[plugins.crasher]\nentry = "x:X"')
        + '[plugins.extra]\nentry = "n:N"\n'
    )
    d = diff(tmp_path, BASE + '[plugins.gone]\nentry = "g:G"\n', new)
    assert d.added == ("extra",)
    assert d.removed == ("gone",)
    assert d.swap == ("echo",)
    assert d.scale == ("counter",)
    assert d.retune == ("crasher",)
    assert d.changed["crasher"] == ("health_check.interval",)
    assert d.groups == ("root",)  # its children changed with the plugin list
    assert d.summary()["swapped"] == ["echo"]


def test_a_swap_wins_over_a_scale(tmp_path: Path) -> None:
    new = BASE.replace("instances = 2", "instances = 3\nconfig = { size = 5 }")
    d = diff(tmp_path, BASE, new)
    assert d.swap == ("counter",)
    assert d.scale == ()
    assert set(d.changed["counter"]) == {"instances", "config"}


def test_daemon_keys_that_need_a_restart_are_named(tmp_path: Path) -> None:
    new = BASE.replace('runtime_dir = "run"', 'runtime_dir = "elsewhere"\ncall_timeout = 3.0')
    d = diff(tmp_path, BASE, new)
    assert set(d.daemon) >= {"runtime_dir", "control_socket", "call_timeout"}
    assert set(d.daemon_restart) == {"runtime_dir", "control_socket"}
