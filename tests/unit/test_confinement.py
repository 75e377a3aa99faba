"""Refusing, or degrading, sandboxes the kernel cannot enforce (no processes)."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
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


def test_plugins_get_back_the_open_files_limit_the_daemon_raised(tmp_path: Path) -> None:
    # in a child process: raising the limit is for good in the process that does it
    code = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        sys.path[:0] = [{root!r}]
        from tests.unit.test_confinement import confinement, NOTHING
        from osk_daemon.isolation.rlimits import raise_open_files
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_files() == (min(256, hard), hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert raise_open_files() is None  # nothing left to raise
        conf = confinement(Path({tmp!r}), 'level = "none"', NOTHING)
        plan = conf._plan("p", conf.config.plugins["p"], 0, ())
        print(plan.rlimits)
        """
    ).format(root=str(Path(__file__).resolve().parents[2]), tmp=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert out.stdout.strip() == str((("NOFILE", min(256, hard), hard),))
