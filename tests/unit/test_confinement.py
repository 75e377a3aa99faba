"""Refusing, or degrading, sandboxes the kernel cannot enforce (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from osk_daemon.config import load_config
from osk_daemon.errors import ConfigError
from osk_daemon.isolation.plan import KernelFeatures
from osk_daemon.supervisor.confinement import Confinement, cgroup_name

pytestmark = pytest.mark.timeout(10)

NOTHING = KernelFeatures()  # a kernel without Landlock, seccomp or namespaces
EVERYTHING = KernelFeatures(
    landlock_abi=7,
    seccomp=True,
    libseccomp=True,
    user_namespaces=True,
    net_namespaces=True,
    no_new_privs=True,
)


def confinement(tmp_path: Path, sandbox: str, features: KernelFeatures) -> Confinement:
    cfg = tmp_path / "osk.toml"
    cfg.write_text(
        f'[daemon]\nruntime_dir = "run"\n[plugins.p]\nentry = "m:C"\n'
        f"[plugins.p.sandbox]\n{sandbox}\n"
    )
    return Confinement(load_config(cfg), cgroups=None, features=features)


def test_unenforceable_level_is_refused_naming_the_plugin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        confinement(tmp_path, 'level = "strict"', NOTHING).check()
    assert err.value.key == "plugins.p.sandbox"
    assert "cannot be enforced" in err.value.reason
    assert "require = false" in err.value.reason


def test_require_false_degrades_with_a_warning(tmp_path: Path) -> None:
    conf = confinement(tmp_path, 'level = "strict"\nrequire = false', NOTHING)
    assert conf.degradation("p") == ()
    warnings = conf.check()
    assert len(warnings) == 1
    assert warnings[0].startswith("p: running degraded")
    steps = [line.split(":", 1)[0] for line in conf.degradation("p")]
    assert steps == ["no_new_privs", "landlock", "net_namespace", "seccomp"]
    assert conf.degradation("other") == ()


def test_limit_without_cgroups_with_require_false_is_a_degradation(tmp_path: Path) -> None:
    cfg = tmp_path / "osk.toml"
    cfg.write_text(
        '[plugins.p]\nentry = "m:C"\n[plugins.p.limits]\nmemory = "64MiB"\n'
        "[plugins.p.sandbox]\nrequire = false\n"
    )
    conf = Confinement(load_config(cfg), cgroups=None, features=EVERYTHING)
    assert len(conf.check()) == 1
    assert conf.degradation("p") == (
        "limits.memory: needs the memory cgroup controller (cgroups are off)",
    )


def test_enforceable_level_passes(tmp_path: Path) -> None:
    assert confinement(tmp_path, 'level = "paranoid"', EVERYTHING).check() == []


def test_limits_without_cgroups_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "osk.toml"
    cfg.write_text('[plugins.p]\nentry = "m:C"\n[plugins.p.limits]\nmemory = "64MiB"\n')
    with pytest.raises(ConfigError, match="memory cgroup controller"):
        Confinement(load_config(cfg), cgroups=None, features=EVERYTHING).check()


@pytest.mark.parametrize("require", ["true", "false"])
@pytest.mark.parametrize("features", [EVERYTHING, NOTHING], ids=["enforceable", "bare-kernel"])
def test_unknown_user_is_refused_whatever_require_says(
    tmp_path: Path, require: str, features: KernelFeatures
) -> None:
    sandbox = f'level = "standard"\nuser = "no-such-user-xyz"\nrequire = {require}'
    with pytest.raises(ConfigError) as err:
        confinement(tmp_path, sandbox, features).check()
    assert err.value.file == str(tmp_path / "osk.toml")
    assert err.value.key == "plugins.p.sandbox.user"
    assert "no such user 'no-such-user-xyz'" in err.value.reason


def test_unknown_group_is_refused_with_require_false(tmp_path: Path) -> None:
    sandbox = 'level = "strict"\ngroup = "no-such-group-xyz"\nrequire = false'
    with pytest.raises(ConfigError) as err:
        confinement(tmp_path, sandbox, NOTHING).check()
    assert err.value.file == str(tmp_path / "osk.toml")
    assert err.value.key == "plugins.p.sandbox.group"
    assert "no such group 'no-such-group-xyz'" in err.value.reason


def test_cgroup_subtree_is_named_per_runtime_dir() -> None:
    assert cgroup_name(Path("/run/a")) != cgroup_name(Path("/run/b"))
    assert cgroup_name(Path("/run/a")) == cgroup_name(Path("/run/a"))
