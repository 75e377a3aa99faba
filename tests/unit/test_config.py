"""Config loading: the example file, defaults, drop-ins, and one exact error per mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osk_daemon.config import (
    ROOT_GROUP,
    Config,
    LogFormat,
    LogLevel,
    Restart,
    SpawnMode,
    Strategy,
    config_json_schema,
    format_size,
    load_config,
    parse_size,
)
from osk_daemon.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

EXAMPLE = """\
[daemon]
runtime_dir = "/run/osk"
control_socket = "/run/osk/control.sock"
[plugins.echo]
entry = "echo_plugin:Echo"
path = ["plugins"]
version = "1.0.0"
instances = 2
restart = "permanent"
shutdown_timeout = 5.0
config = { greeting = "hi" }
[plugins.echo.health_check]
interval = 1.0
timeout = 0.5
failure_threshold = 3
success_threshold = 1
auto_restart = true
[groups.root]
strategy = "one_for_one"
intensity = 5
period = 10.0
children = ["echo"]
"""

MINIMAL = '[plugins.echo]\nentry = "echo_plugin:Echo"\n'


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def load(root: Path, files: dict[str, str], main: str = "osk.toml") -> Config:
    write(root, files)
    return load_config(root / main)


def test_example_loads_with_exact_values(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    config = load(tmp_path, {"osk.toml": EXAMPLE})

    assert config.source == (tmp_path / "osk.toml").absolute()
    assert config.daemon.runtime_dir == Path("/run/osk")
    assert config.daemon.control_socket == Path("/run/osk/control.sock")
    echo = config.plugins["echo"]
    assert echo.entry == "echo_plugin:Echo"
    assert echo.path == [tmp_path / "plugins"]
    assert echo.version == "1.0.0"
    assert echo.instances == 2
    assert echo.restart is Restart.PERMANENT
    assert echo.shutdown_timeout == 5.0
    assert echo.config == {"greeting": "hi"}
    hc = echo.health_check
    assert (hc.interval, hc.timeout, hc.failure_threshold, hc.success_threshold) == (
        1.0,
        0.5,
        3,
        1,
    )
    assert hc.auto_restart is True
    assert hc.enabled is True
    root = config.groups[ROOT_GROUP]
    assert root.strategy is Strategy.ONE_FOR_ONE
    assert (root.intensity, root.period, root.children) == (5, 10.0, ["echo"])


def test_example_with_negative_interval_names_file_key_and_reason(tmp_path: Path) -> None:
    write(tmp_path, {"osk.toml": EXAMPLE.replace("interval = 1.0", "interval = -1")})
    main = tmp_path / "osk.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(main))
    assert str(info.value) == f"{main}: plugins.echo.health_check.interval: must be > 0, got -1"
    assert info.value.file == str(main)
    assert info.value.key == "plugins.echo.health_check.interval"
    assert info.value.reason == "must be > 0, got -1"


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, {"osk.toml": MINIMAL})

    d = config.daemon
    assert d.runtime_dir == Path("/run/osk")
    assert d.control_socket == Path("/run/osk/control.sock")
    assert d.control_group is None
    assert d.log_format is LogFormat.TEXT
    assert d.log_level is LogLevel.INFO
    assert d.log_buffer_lines == 1000
    assert (d.heartbeat_interval, d.heartbeat_timeout) == (1.0, 3.0)
    assert d.max_message_size == 16 * 1024 * 1024
    assert (d.call_timeout, d.shutdown_timeout) == (10.0, 30.0)

    p = config.plugins["echo"]
    assert p.path == []
    assert p.version is None  # planning makes it 0.0.0, or picks from plugins_dir
    assert p.critical is False
    assert p.instances == 1
    assert p.restart is Restart.PERMANENT
    assert (p.shutdown_timeout, p.start_timeout) == (5.0, 10.0)
    assert p.spawn is SpawnMode.ZYGOTE
    assert p.standby is False
    assert (p.config, p.env) == ({}, {})
    hc = p.health_check
    assert (hc.enabled, hc.interval, hc.timeout) == (True, 1.0, 0.5)
    assert (hc.failure_threshold, hc.success_threshold, hc.auto_restart) == (3, 1, True)
    b = p.backoff
    assert (b.base, b.factor, b.max, b.jitter, b.reset_after) == (0.1, 2.0, 30.0, 0.1, 10.0)


@pytest.mark.parametrize(("timeout", "interval"), [("0.6", 0.2), ("1.5", 0.5), ("9.0", 1.0)])
def test_an_unset_heartbeat_interval_fits_the_timeout(
    tmp_path: Path, timeout: str, interval: float
) -> None:
    daemon = f"[daemon]\nheartbeat_timeout = {timeout}\n"
    d = load(tmp_path, {"osk.toml": daemon + MINIMAL}).daemon
    assert d.heartbeat_interval == pytest.approx(interval)  # 3 beats per timeout, at most 1 s


def test_models_are_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, {"osk.toml": MINIMAL})
    with pytest.raises(ValueError, match="frozen"):
        config.plugins["echo"].instances = 3


def test_control_socket_follows_runtime_dir(tmp_path: Path) -> None:
    config = load(tmp_path, {"osk.toml": '[daemon]\nruntime_dir = "/srv/osk"\n'})
    assert config.daemon.control_socket == Path("/srv/osk/control.sock")


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    text = '[daemon]\nruntime_dir = "run"\n' + MINIMAL + 'path = ["plugins", "../shared", "/abs"]\n'
    config = load(tmp_path, {"etc/osk.toml": text}, main="etc/osk.toml")

    assert config.daemon.runtime_dir == tmp_path / "etc" / "run"
    assert config.daemon.control_socket == tmp_path / "etc" / "run" / "control.sock"
    assert config.plugins["echo"].path == [
        tmp_path / "etc" / "plugins",
        tmp_path / "shared",
        Path("/abs"),
    ]


def test_sizes_and_enums_parse(tmp_path: Path) -> None:
    text = (
        '[daemon]\nmax_message_size = "512KiB"\nlog_format = "json"\nlog_level = "debug"\n'
        + MINIMAL
        + 'spawn = "exec"\nrestart = "transient"\nenv = { A = "1" }\n'
    )
    config = load(tmp_path, {"osk.toml": text})
    assert config.daemon.max_message_size == 512 * 1024
    assert config.daemon.log_format == "json"
    assert config.daemon.log_level is LogLevel.DEBUG
    assert config.plugins["echo"].spawn is SpawnMode.EXEC
    assert config.plugins["echo"].restart is Restart.TRANSIENT
    assert config.plugins["echo"].env == {"A": "1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("16MiB", 16 * 1024**2),
        ("512KiB", 512 * 1024),
        ("1G", 1024**3),
        ("1 kb", 1000),
        ("1.5K", 1536),
        ("100B", 100),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "12 parsecs", "-1", "", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|unit"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(16 * 1024**2) == "16MiB"
    assert format_size(1000) == "1000B"


def test_root_is_synthesized_from_unreferenced_names_in_file_order(tmp_path: Path) -> None:
    text = (
        '[plugins.b]\nentry = "b:B"\n[plugins.a]\nentry = "a:A"\n[plugins.c]\nentry = "c:C"\n'
        '[groups.workers]\nstrategy = "rest_for_one"\nchildren = ["c"]\n'
    )
    config = load(tmp_path, {"osk.toml": text})
    assert list(config.plugins) == ["b", "a", "c"]
    root = config.groups[ROOT_GROUP]
    assert root.children == ["b", "a", "workers"]
    assert (root.strategy, root.intensity, root.period) == (Strategy.ONE_FOR_ONE, 5, 10.0)
    assert config.groups["workers"].strategy is Strategy.REST_FOR_ONE


def test_existing_root_gets_unreferenced_names_appended(tmp_path: Path) -> None:
    text = (
        '[plugins.a]\nentry = "a:A"\n[plugins.b]\nentry = "b:B"\n'
        '[groups.root]\nstrategy = "one_for_all"\nchildren = ["b"]\n'
    )
    root = load(tmp_path, {"osk.toml": text}).groups[ROOT_GROUP]
    assert root.children == ["b", "a"]
    assert root.strategy is Strategy.ONE_FOR_ALL


def test_no_plugins_gives_an_empty_root(tmp_path: Path) -> None:
    config = load(tmp_path, {"osk.toml": ""})
    assert config.plugins == {}
    assert config.groups[ROOT_GROUP].children == []


def test_drop_ins_merge_over_main_in_sorted_order(tmp_path: Path) -> None:
    main = 'include = ["conf.d/*.toml"]\n[daemon]\nlog_level = "info"\n' + MINIMAL
    main += "instances = 2\n[plugins.echo.health_check]\ninterval = 5.0\n"
    config = load(
        tmp_path,
        {
            "osk.toml": main,
            "conf.d/20-late.toml": '[plugins.echo]\ninstances = 4\npath = ["mine"]\n',
            "conf.d/10-early.toml": (
                '[daemon]\nlog_level = "debug"\n[plugins.echo]\ninstances = 3\n'
                '[plugins.extra]\nentry = "extra"\n'
            ),
            "conf.d/ignored.txt": "not toml",
        },
    )
    assert config.daemon.log_level is LogLevel.DEBUG
    echo = config.plugins["echo"]
    assert echo.instances == 4
    assert echo.health_check.interval == 5.0
    assert echo.path == [tmp_path / "conf.d" / "mine"]
    assert list(config.plugins) == ["echo", "extra"]
    assert config.groups[ROOT_GROUP].children == ["echo", "extra"]


def test_empty_include_glob_is_fine(tmp_path: Path) -> None:
    config = load(tmp_path, {"osk.toml": 'include = ["conf.d/*.toml"]\n' + MINIMAL})
    assert list(config.plugins) == ["echo"]


def test_nested_includes_are_followed(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "osk.toml": 'include = ["a.d/x.toml"]\n' + MINIMAL,
            "a.d/x.toml": 'include = ["y.toml"]\n[plugins.echo]\ninstances = 2\n',
            "a.d/y.toml": "[plugins.echo]\ninstances = 3\n",
        },
    )
    assert config.plugins["echo"].instances == 3


def error_for(tmp_path: Path, files: dict[str, str]) -> ConfigError:
    write(tmp_path, files)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "osk.toml")
    return info.value


PLUGIN_ERRORS = [
    ("instances = 0", "plugins.echo.instances", "must be >= 1, got 0"),
    ("instances = 65", "plugins.echo.instances", "must be <= 64, got 65"),
    ("instances = 1.5", "plugins.echo.instances", "expected an integer, got 1.5"),
    ("instances = true", "plugins.echo.instances", "expected an integer, got true"),
    ("shutdown_timeout = 'abc'", "plugins.echo.shutdown_timeout", "expected a number, got 'abc'"),
    ("start_timeout = 0", "plugins.echo.start_timeout", "must be > 0, got 0"),
    (
        "restart = 'forever'",
        "plugins.echo.restart",
        "must be one of 'permanent', 'transient' or 'temporary', got 'forever'",
    ),
    ("spawn = 'fork'", "plugins.echo.spawn", "must be one of 'zygote' or 'exec', got 'fork'"),
    ("version = 'one'", "plugins.echo.version", "must be a SemVer 2.0 version"),
    ("version = '01.0.0'", "plugins.echo.version", "must be a SemVer 2.0 version"),
    ("path = 'plugins'", "plugins.echo.path", "expected an array, got 'plugins'"),
    ("path = [5]", "plugins.echo.path[0]", "expected a path string, got 5"),
    ("env = { A = 1 }", "plugins.echo.env.A", "expected a string, got 1"),
    ("config = 5", "plugins.echo.config", "expected a table, got 5"),
    ("instancs = 2", "plugins.echo.instancs", "unknown key 'instancs' (did you mean 'instances'?)"),
    ("zzz = 2", "plugins.echo.zzz", "unknown key 'zzz'"),
    (
        "health_check = { intervall = 2.0 }",
        "plugins.echo.health_check.intervall",
        "unknown key 'intervall' (did you mean 'interval'?)",
    ),
    (
        "health_check = { interval = 1.0, timeout = 2.0 }",
        "plugins.echo.health_check.timeout",
        "must be <= interval (1.0), got 2.0",
    ),
    (
        "health_check = { failure_threshold = 0 }",
        "plugins.echo.health_check.failure_threshold",
        "must be >= 1, got 0",
    ),
    ("health_check = { enabled = 1 }", "plugins.echo.health_check.enabled", "expected true or"),
    ("standby = 'yes'", "plugins.echo.standby", "expected true or"),
    ("backoff = { factor = 0.5 }", "plugins.echo.backoff.factor", "must be >= 1, got 0.5"),
    ("backoff = { jitter = 2 }", "plugins.echo.backoff.jitter", "must be <= 1, got 2"),
    ("backoff = { base = -0.1 }", "plugins.echo.backoff.base", "must be >= 0, got -0.1"),
    ("rollout = { start_cpu = -0.01 }", "plugins.echo.rollout.start_cpu", "must be >= 0"),
    ("rollout = { start_cpu_for = 0 }", "plugins.echo.rollout.start_cpu_for", "must be > 0"),
    ("rollout = { min_ready = -1 }", "plugins.echo.rollout.min_ready", "must be >= 0"),
    ("rollout = { min_requests = 0 }", "plugins.echo.rollout.min_requests", "must be >= 1"),
    (
        "rollout = { max_surge = 0, max_unavailable = 0 }",
        "plugins.echo.rollout",
        "max_surge and max_unavailable cannot both be 0",
    ),
]


@pytest.mark.parametrize(("line", "key", "reason"), PLUGIN_ERRORS)
def test_plugin_errors_name_file_key_and_reason(
    tmp_path: Path, line: str, key: str, reason: str
) -> None:
    err = error_for(tmp_path, {"osk.toml": MINIMAL + line + "\n"})
    assert (err.file, err.key) == (str(tmp_path / "osk.toml"), key)
    assert err.reason.startswith(reason)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("", "must not be empty"),
        ("mod:", "expected 'module:Class'"),
        ("1mod:Cls", "expected 'module:Class'"),
        ("has space", "may not contain spaces"),
    ],
)
def test_bad_entry(tmp_path: Path, entry: str, reason: str) -> None:
    err = error_for(tmp_path, {"osk.toml": f'[plugins.echo]\nentry = "{entry}"\n'})
    assert err.key == "plugins.echo.entry"
    assert reason in err.reason


@pytest.mark.parametrize("entry", ["pkg.mod:Cls", "pkg.mod:Outer.Inner", "echo", "my-plugin"])
def test_good_entries(tmp_path: Path, entry: str) -> None:
    config = load(tmp_path, {"osk.toml": f'[plugins.echo]\nentry = "{entry}"\n'})
    assert config.plugins["echo"].entry == entry


@pytest.mark.parametrize("version", ["1.0.0-rc.1", "1.0.0+build.5", "2.10.3-alpha.1+sha.abc"])
def test_semver_with_prerelease_and_build(tmp_path: Path, version: str) -> None:
    config = load(tmp_path, {"osk.toml": MINIMAL + f'version = "{version}"\n'})
    assert config.plugins["echo"].version == version


DAEMON_ERRORS = [
    ("log_buffer_lines = 0", "daemon.log_buffer_lines", "must be > 0, got 0"),
    (
        "log_format = 'xml'",
        "daemon.log_format",
        "must be one of 'text', 'json' or 'logfmt', got 'xml'",
    ),
    ("log_level = 'loud'", "daemon.log_level", "must be one of 'debug', "),
    ("heartbeat_interval = -1", "daemon.heartbeat_interval", "must be > 0, got -1"),
    (
        "heartbeat_interval = 2.0\nheartbeat_timeout = 1.0",
        "daemon.heartbeat_timeout",
        "must be > heartbeat_interval (2.0), got 1.0",
    ),
    ("max_message_size = 512", "daemon.max_message_size", "must be >= 1024, got 512"),
    ("max_message_size = 'lots'", "daemon.max_message_size", "expected a size like '16MiB'"),
    ("max_message_size = '2 parsecs'", "daemon.max_message_size", "unknown size unit 'parsecs'"),
    ("call_timeout = 0", "daemon.call_timeout", "must be > 0, got 0"),
    ("shutdown_timeout = 'x'", "daemon.shutdown_timeout", "expected a number, got 'x'"),
    ("runtime_dir = 5", "daemon.runtime_dir", "expected a path string, got 5"),
    ("run_dir = '/x'", "daemon.run_dir", "unknown key 'run_dir' (did you mean 'runtime_dir'?)"),
]


@pytest.mark.parametrize(("line", "key", "reason"), DAEMON_ERRORS)
def test_daemon_errors_name_file_key_and_reason(
    tmp_path: Path, line: str, key: str, reason: str
) -> None:
    err = error_for(tmp_path, {"osk.toml": f"[daemon]\n{line}\n"})
    assert (err.file, err.key) == (str(tmp_path / "osk.toml"), key)
    assert err.reason.startswith(reason)


def test_unknown_top_level_table(tmp_path: Path) -> None:
    err = error_for(tmp_path, {"osk.toml": '[plugin.echo]\nentry = "x"\n'})
    assert (err.key, err.reason) == ("plugin", "unknown key 'plugin' (did you mean 'plugins'?)")


def test_missing_entry(tmp_path: Path) -> None:
    err = error_for(tmp_path, {"osk.toml": "[plugins.echo]\ninstances = 2\n"})
    assert (err.key, err.reason) == ("plugins.echo.entry", "required key is missing")


@pytest.mark.parametrize("table", ["plugins", "groups"])
def test_bad_names(tmp_path: Path, table: str) -> None:
    err = error_for(tmp_path, {"osk.toml": f'[{table}."Bad Name"]\nentry = "x"\n'})
    assert err.key == f"{table}.Bad Name"
    assert err.reason.startswith("invalid name 'Bad Name'")
    assert str(err).startswith(f"{tmp_path / 'osk.toml'}: {table}.Bad Name: invalid name")


def test_name_too_long(tmp_path: Path) -> None:
    name = "a" * 64
    err = error_for(tmp_path, {"osk.toml": f'[plugins.{name}]\nentry = "x"\n'})
    assert err.key == f"plugins.{name}"


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    err = error_for(tmp_path, {"osk.toml": '[daemon]\nlog_level = "info\n'})
    assert err.file == str(tmp_path / "osk.toml")
    assert err.key == ""
    assert err.reason.startswith("invalid TOML:")
    assert "line 2" in err.reason
    assert "column" in err.reason


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert (info.value.file, info.value.key, info.value.reason) == (
        str(missing),
        "",
        "no such file",
    )
    assert str(info.value) == f"{missing}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "osk.toml").write_bytes(b"[daemon]\n# \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(tmp_path / "osk.toml")


GROUP_ERRORS = [
    (
        '[groups.root]\nchildren = ["echo", "ehco2"]\n',
        "groups.root.children[1]",
        "unknown child 'ehco2': no plugin or group has that name (did you mean 'echo'?)",
    ),
    (
        '[groups.a]\nchildren = ["echo"]\n[groups.b]\nchildren = ["echo"]\n',
        "groups.b.children[0]",
        "plugin 'echo' is already a child of group 'a'",
    ),
    (
        '[groups.a]\nchildren = ["echo", "echo"]\n',
        "groups.a.children[1]",
        "plugin 'echo' is listed twice",
    ),
    (
        '[groups.a]\nchildren = ["b"]\n[groups.b]\nchildren = ["a"]\n',
        "groups.a.children",
        "groups form a cycle: a -> b -> a",
    ),
    (
        '[groups.a]\nchildren = ["b"]\n[groups.b]\nchildren = ["c"]\n'
        '[groups.c]\nchildren = ["a"]\n',
        "groups.a.children",
        "groups form a cycle: a -> b -> c -> a",
    ),
    ('[groups.a]\nchildren = ["a"]\n', "groups.a.children", "groups form a cycle: a -> a"),
    (
        '[groups.a]\nchildren = ["root"]\n[groups.root]\n',
        "groups.a.children[0]",
        "'root' is the top of the tree and cannot be a child",
    ),
    (
        "[groups.echo]\nchildren = []\n",
        "groups.echo",
        "name 'echo' is used by both a plugin and a group",
    ),
    (
        "[groups.a]\nstrategy = 'all_for_one'\n",
        "groups.a.strategy",
        "must be one of 'one_for_one', 'one_for_all' or 'rest_for_one', got 'all_for_one'",
    ),
    ("[groups.a]\nintensity = -1\n", "groups.a.intensity", "must be >= 0, got -1"),
    ("[groups.a]\nperiod = 0\n", "groups.a.period", "must be > 0, got 0"),
    ('[groups.a]\nchildren = [""]\n', "groups.a.children[0]", "invalid name ''"),
    ("[groups.a]\nchildren = 'echo'\n", "groups.a.children", "expected an array, got 'echo'"),
]


@pytest.mark.parametrize(("groups", "key", "reason"), GROUP_ERRORS)
def test_group_errors_name_file_key_and_reason(
    tmp_path: Path, groups: str, key: str, reason: str
) -> None:
    err = error_for(tmp_path, {"osk.toml": MINIMAL + groups})
    assert (err.file, err.key) == (str(tmp_path / "osk.toml"), key)
    assert err.reason.startswith(reason)


def test_drop_in_error_names_the_drop_in(tmp_path: Path) -> None:
    err = error_for(
        tmp_path,
        {
            "osk.toml": 'include = ["conf.d/*.toml"]\n' + MINIMAL,
            "conf.d/10-ok.toml": "[plugins.echo]\ninstances = 2\n",
            "conf.d/20-bad.toml": "[plugins.echo.health_check]\ninterval = -1\n",
        },
    )
    bad = tmp_path / "conf.d" / "20-bad.toml"
    assert str(err) == f"{bad}: plugins.echo.health_check.interval: must be > 0, got -1"


def test_drop_in_unknown_key_and_group_errors_name_the_drop_in(tmp_path: Path) -> None:
    files = {
        "osk.toml": 'include = ["conf.d/*.toml"]\n' + MINIMAL,
        "conf.d/10.toml": "[plugins.echo.health_check]\nintervall = 2\n",
    }
    err = error_for(tmp_path, files)
    assert err.file == str(tmp_path / "conf.d" / "10.toml")
    assert err.reason == "unknown key 'intervall' (did you mean 'interval'?)"

    files["conf.d/10.toml"] = '[groups.g]\nchildren = ["nope"]\n'
    err = error_for(tmp_path, files)
    assert (err.file, err.key) == (str(tmp_path / "conf.d" / "10.toml"), "groups.g.children[0]")


def test_missing_key_in_a_table_created_by_a_drop_in_names_the_drop_in(tmp_path: Path) -> None:
    err = error_for(
        tmp_path,
        {
            "osk.toml": 'include = ["conf.d/*.toml"]\n' + MINIMAL,
            "conf.d/new.toml": "[plugins.other]\ninstances = 2\n",
        },
    )
    assert (err.file, err.key) == (str(tmp_path / "conf.d" / "new.toml"), "plugins.other.entry")


def test_drop_in_override_moves_blame_to_the_drop_in(tmp_path: Path) -> None:
    # main sets a valid interval; the drop-in's timeout breaks the timeout <= interval rule.
    err = error_for(
        tmp_path,
        {
            "osk.toml": 'include = ["d.toml"]\n' + MINIMAL + "[plugins.echo.health_check]\n"
            "interval = 1.0\n",
            "d.toml": "[plugins.echo.health_check]\ntimeout = 3.0\n",
        },
    )
    assert (err.file, err.key) == (str(tmp_path / "d.toml"), "plugins.echo.health_check.timeout")
    assert err.reason == "must be <= interval (1.0), got 3.0"


def test_drop_in_syntax_error_names_the_drop_in(tmp_path: Path) -> None:
    err = error_for(
        tmp_path,
        {"osk.toml": 'include = ["conf.d/*.toml"]\n' + MINIMAL, "conf.d/a.toml": "[[[\n"},
    )
    assert err.file == str(tmp_path / "conf.d" / "a.toml")
    assert "line 1" in err.reason


def test_include_errors(tmp_path: Path) -> None:
    err = error_for(tmp_path, {"osk.toml": 'include = "conf.d/*.toml"\n'})
    assert (err.key, err.reason) == (
        "include",
        "expected an array of glob strings, got 'conf.d/*.toml'",
    )

    err = error_for(tmp_path, {"osk.toml": 'include = ["missing.toml"]\n'})
    assert (err.key, err.reason) == ("include[0]", "no such file: 'missing.toml'")


def test_include_cycle(tmp_path: Path) -> None:
    err = error_for(
        tmp_path,
        {"osk.toml": 'include = ["b.toml"]\n', "b.toml": 'include = ["osk.toml"]\n'},
    )
    assert err.file == str(tmp_path / "b.toml")
    assert err.key == "include[0]"
    assert err.reason.startswith("include cycle: ")


def test_first_error_wins(tmp_path: Path) -> None:
    err = error_for(tmp_path, {"osk.toml": "[daemon]\ncall_timeout = -1\nshutdown_timeout = -2\n"})
    assert err.key == "daemon.call_timeout"


def test_json_schema() -> None:
    schema = config_json_schema()
    json.dumps(schema)
    assert {"daemon", "plugins", "groups", "include"} <= set(schema["properties"])
    assert "source" not in schema["properties"]
    assert schema["additionalProperties"] is False
