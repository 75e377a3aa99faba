"""The control wire format, access rules, oskctl's socket choice and its rendering."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from osk_daemon.control import render
from osk_daemon.control.oskctl import (
    DEFAULT_SOCKET,
    UsageError,
    build_parser,
    named_command,
    resolve_socket,
)
from osk_daemon.control.peercred import PeerCred, is_allowed, resolve_group, supplementary_groups
from osk_daemon.control.protocol import (
    BadReply,
    BadRequest,
    ErrorReply,
    LineSplitter,
    LineTooLong,
    Request,
    Result,
    StreamItem,
    decode_reply,
    decode_request,
    encode_error,
    encode_exception,
    encode_request,
    encode_result,
    encode_stream_item,
)
from osk_daemon.errors import ConfigError, Unavailable

pytestmark = pytest.mark.timeout(30)


# -- protocol ---------------------------------------------------------------------------------


def test_request_round_trip() -> None:
    line = encode_request("status", {"plugin": "échos"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == Request("status", {"plugin": "échos"})
    assert decode_request(encode_request("shutdown")) == Request("shutdown", {})


def test_request_without_args_or_with_null_args_means_empty() -> None:
    assert decode_request(b'{"cmd": "events"}') == Request("events", {})
    assert decode_request(b'{"cmd": "events", "args": null}') == Request("events", {})


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        (b'{"args": {}}', "cmd"),
        (b'{"cmd": ""}', "cmd"),
        (b'{"cmd": 3}', "cmd"),
        (b'{"cmd": "x", "args": [1]}', "args"),
        (b'{"cmd": "x", "extra": 1}', "extra"),
        (b"", "JSON"),
    ],
)
def test_malformed_requests_are_bad_request(line: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment) as info:
        decode_request(line)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (encode_result({"a": [1, 2]}), Result({"a": [1, 2]})),
        (encode_result(None), Result(None)),
        (encode_stream_item("x"), StreamItem("x")),
        (encode_stream_item(None), StreamItem(None)),
        (encode_error("forbidden", "no"), ErrorReply("forbidden", "no")),
        (encode_exception(Unavailable("gone")), ErrorReply("unavailable", "gone")),
    ],
)
def test_reply_round_trip(line: bytes, reply: Any) -> None:
    assert line.endswith(b"\n")
    assert decode_reply(line) == reply


def test_reply_wire_shape_is_exact() -> None:
    assert json.loads(encode_result(3)) == {"ok": True, "result": 3}
    assert json.loads(encode_stream_item({"k": 1})) == {"stream": {"k": 1}}
    assert json.loads(encode_error("c", "m")) == {
        "ok": False,
        "error": {"code": "c", "message": "m"},
    }


@pytest.mark.parametrize(
    "line",
    [b"nope", b"[]", b'{"ok": "yes"}', b'{"ok": false, "error": "x"}', b'{"ok": false}', b"\xff"],
)
def test_malformed_replies_are_bad_reply(line: bytes) -> None:
    with pytest.raises(BadReply):
        decode_reply(line)


def test_results_that_are_not_json_raise() -> None:
    with pytest.raises(TypeError):
        encode_result(object())


def test_splitter_joins_chunks_and_splits_lines() -> None:
    splitter = LineSplitter(max_line=100)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b":1}\n{") == [b'{"a":1}']
    assert splitter.pending == 1
    assert splitter.feed(b"}\n\n[]\n") == [b"{}", b"", b"[]"]
    assert splitter.pending == 0


def test_splitter_accepts_a_line_at_the_limit_and_refuses_one_past_it() -> None:
    assert LineSplitter(max_line=4).feed(b"abcd\n") == [b"abcd"]
    with pytest.raises(LineTooLong):
        LineSplitter(max_line=4).feed(b"abcde\n")
    splitter = LineSplitter(max_line=4)
    splitter.feed(b"abcd")
    with pytest.raises(LineTooLong) as info:
        splitter.feed(b"e")
    assert info.value.code == "bad_request"


# -- access rules -----------------------------------------------------------------------------


def _no_groups(pid: int) -> frozenset[int]:
    return frozenset()


@pytest.mark.parametrize(
    ("peer", "allowed_gid", "groups", "allowed"),
    [
        (PeerCred(1, 0, 0), None, frozenset(), True),
        (PeerCred(1, 1000, 1000), None, frozenset(), True),  # the daemon's own uid
        (PeerCred(1, 65534, 65534), None, frozenset(), False),
        (PeerCred(1, 65534, 65534), 4242, frozenset(), False),
        (PeerCred(1, 65534, 4242), 4242, frozenset(), True),
        (PeerCred(1, 65534, 65534), 4242, frozenset({10, 4242}), True),
    ],
)
def test_is_allowed(
    peer: PeerCred, allowed_gid: int | None, groups: frozenset[int], allowed: bool
) -> None:
    got = is_allowed(peer, own_uid=1000, allowed_gid=allowed_gid, groups_of=lambda _: groups)
    assert got is allowed


def test_supplementary_groups_are_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tx\nGroups:\t4 24 27 \nNSpid:\t42\n")
    assert supplementary_groups(42, proc=tmp_path) == frozenset({4, 24, 27})
    assert supplementary_groups(43, proc=tmp_path) == frozenset()


def test_resolve_group() -> None:
    assert resolve_group("0") == 0
    assert resolve_group("root") == 0
    with pytest.raises(ConfigError, match="control_group"):
        resolve_group("no-such-group-osk")


# -- oskctl: socket choice and arguments ------------------------------------------------------


def test_socket_precedence(tmp_path: Path) -> None:
    config = tmp_path / "osk.toml"
    config.write_text('[daemon]\ncontrol_socket = "run/ctl.sock"\n')
    env = {"OSK_SOCKET": "/env.sock", "OSK_CONFIG": str(config)}
    assert resolve_socket("/flag.sock", str(config), env).path == "/flag.sock"
    assert resolve_socket(None, str(config), env).path == "/env.sock"
    choice = resolve_socket(None, None, {"OSK_CONFIG": str(config)})
    assert choice.path == str(tmp_path / "run" / "ctl.sock")
    assert "$OSK_CONFIG" in choice.source and "control_socket" in choice.source
    assert resolve_socket(None, None, {}).path == DEFAULT_SOCKET


def test_socket_from_runtime_dir_and_absolute_paths(tmp_path: Path) -> None:
    config = tmp_path / "osk.toml"
    config.write_text('[daemon]\nruntime_dir = "rt"\n')
    assert resolve_socket(None, str(config), {}).path == str(tmp_path / "rt" / "control.sock")
    config.write_text('[daemon]\ncontrol_socket = "/abs/c.sock"\nruntime_dir = "rt"\n')
    assert resolve_socket(None, str(config), {}).path == "/abs/c.sock"
    config.write_text("[plugins]\n")
    assert resolve_socket(None, str(config), {}).path == DEFAULT_SOCKET


@pytest.mark.parametrize("text", ["[daemon\n", "daemon = 3\n", "[daemon]\ncontrol_socket = 1\n"])
def test_bad_config_is_a_usage_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "osk.toml"
    config.write_text(text)
    with pytest.raises(UsageError):
        resolve_socket(None, str(config), {})
    with pytest.raises(UsageError):
        resolve_socket(None, str(tmp_path / "missing.toml"), {})


def test_global_flags_work_before_and_after_the_command() -> None:
    parser = build_parser()
    ns = parser.parse_args(["--json", "--socket", "/a", "status", "p"])
    assert (ns.json, ns.socket, ns.name) == (True, "/a", "p")
    ns = parser.parse_args(["status", "--json", "--timeout", "3"])
    assert (ns.json, ns.socket_timeout) == (True, 3.0)
    ns = parser.parse_args(["--timeout", "7", "call", "p", "m", '{"x": 1}', "--timeout", "2"])
    assert (ns.socket_timeout, ns.call_timeout, ns.call_args) == (7.0, 2.0, {"x": 1})


def test_the_parser_for_one_command_parses_as_the_full_one() -> None:
    argv = ["--socket", "status", "--timeout", "2", "call", "p", "m", "--timeout", "3"]
    assert named_command(argv) == "call"  # "status" is the value of --socket here
    assert build_parser(argv).parse_args(argv) == build_parser().parse_args(argv)
    assert named_command(["--sock", "status", "call", "p", "m"]) == "call"  # abbreviated
    assert named_command(["--json", "--help"]) is None
    assert named_command(["statsu"]) is None  # a typo gets the full parser's error


def test_a_typo_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser(["statsu"]).parse_args(["statsu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'statsu'" in err and "'status'" in err and "'reexec'" in err


def test_bad_args_json_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["call", "p", "m", "{oops"])
    assert info.value.code == 2
    assert "not valid JSON" in capsys.readouterr().err


# -- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0.0s"),
        (3.24, "3.2s"),
        (59.94, "59.9s"),
        (59.96, "1m00s"),
        (312, "5m12s"),
        (7380, "2h03m"),
        (86400 + 7 * 3600 + 5, "1d07h"),
        (-1, "0.0s"),
    ],
)
def test_format_uptime(seconds: float | None, text: str) -> None:
    assert render.format_uptime(seconds) == text


def test_format_status_table() -> None:
    rows = [
        {
            "plugin": "echo",
            "instance": 0,
            "version": "1.2.0",
            "pid": 4242,
            "state": "running",
            "health": "ok",
            "restarts": 0,
            "uptime_s": 312.5,
            "last_exit": None,
            "extra": "ignored",
        },
        {"plugin": "long-plugin-name", "instance": 1, "state": "backoff", "uptime_s": None},
    ]
    assert render.format_status(rows).splitlines() == [
        "PLUGIN            INSTANCE  VERSION  PID   STATE    HEALTH  RESTARTS  UPTIME  LAST EXIT",
        "echo              0         1.2.0    4242  running  ok      0         5m12s   -",
        "long-plugin-name  1         -        -     backoff  -       -         -       -",
    ]


def test_format_status_shows_standbys_only_when_an_instance_has_one() -> None:
    base = {"plugin": "echo", "state": "ready"}
    rows = [
        {**base, "instance": 0, "standby": {"pid": 51, "armed": True}},
        {**base, "instance": 1, "standby": {"pid": 52, "armed": False}},
        {**base, "instance": 2, "standby": {"pid": None, "armed": False}},
        {**base, "instance": 3, "standby": None},
    ]
    lines = render.format_status(rows).splitlines()
    assert lines[0].endswith("LAST EXIT  STANDBY")
    assert [line.split("  ")[-1].strip() for line in lines[1:]] == ["51", "52 arming", "due", "-"]
    assert "STANDBY" not in render.format_status([{**base, "instance": 0, "standby": None}])


def test_format_status_without_rows_is_the_header() -> None:
    header = "PLUGIN  INSTANCE  VERSION  PID  STATE  HEALTH  RESTARTS  UPTIME  LAST EXIT"
    assert render.format_status([]) == header


def test_format_cell() -> None:
    assert render.format_cell({"code": 1, "signal": None}) == "code=1 signal=-"
    assert render.format_cell([1, "a"]) == '[1,"a"]'
    assert render.format_cell(True) == "yes"
    assert render.format_cell("") == "-"


def test_format_json_and_message() -> None:
    assert render.format_json({"a": [1]}) == '{\n  "a": [\n    1\n  ]\n}'
    assert render.format_json("hi") == '"hi"'
    assert render.format_message("started echo") == "started echo"
    assert render.format_message({"a": 1}) == '{\n  "a": 1\n}'
    assert render.format_json_line({"a": 1, "b": "é"}) == '{"a": 1, "b": "é"}'


def test_format_log_line() -> None:
    ts = 1_700_000_000.123
    clock = dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")
    item = {"ts": ts, "plugin": "echo", "instance": 2, "stream": "stderr", "line": "hello"}
    assert render.format_log_line(item) == f"{clock}.123 echo/2 hello"
    assert render.format_log_line({"line": "x"}) == "--:--:--.--- ? x"
