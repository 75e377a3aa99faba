"""Fuzzing every decoder that reads untrusted input: frames, control lines, config files,
manifests. Each must either accept its input or refuse it with its own clear error type,
never crash with anything else.

A few hundred examples each in CI; ``OSK_FUZZ_EXAMPLES=10000`` for a long run.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osk_daemon.config import load_config
from osk_daemon.control.protocol import BadRequest, LineSplitter, decode_request
from osk_daemon.errors import ConfigError, FrameError
from osk_daemon.ipc.codec import (
    Kind,
    decode_header,
    encode_header,
    split_batch,
    split_router_frames,
    unpack,
)
from osk_daemon.supervisor.health_checks import parse_report
from osk_daemon.versioning.manifest import load_manifest

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("OSK_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def near_headers() -> st.SearchStrategy[bytes]:
    """Valid headers, then mutated: most fuzz bytes fail at the first byte, these don't."""
    valid = st.builds(
        lambda kind, i, target, method: encode_header(kind, i, target, method, 0.0),
        st.sampled_from(list(Kind)),
        st.integers(0, 2**63 - 1),
        st.text(max_size=20),
        st.text(max_size=20),
    )

    def mutate(data: bytes, pos: int, byte: int) -> bytes:
        pos %= max(len(data), 1)
        return data[:pos] + bytes([byte]) + data[pos + 1 :]

    return valid | st.builds(mutate, valid, st.integers(0, 200), st.integers(0, 255))


@FUZZ
@given(st.binary(max_size=300) | near_headers() | msgpack_values.map(msgpack.packb))
def test_headers_decode_or_raise_frame_error(data: bytes) -> None:
    try:
        header = decode_header(data)
    except FrameError:
        return
    assert isinstance(header.kind, Kind)
    assert 0 <= header.id < 2**63


@FUZZ
@given(st.lists(st.binary(max_size=40) | near_headers(), max_size=9))
def test_frame_lists_split_or_raise_frame_error(frames: list[bytes]) -> None:
    for split in (split_router_frames, lambda f: split_batch(f, 1), split_batch):
        try:
            split(frames)
        except FrameError:
            pass


@FUZZ
@given(st.binary(max_size=300) | msgpack_values.map(msgpack.packb))
def test_bodies_unpack_or_raise_frame_error(data: bytes) -> None:
    try:
        unpack(data, 1024)
    except FrameError:
        pass


def health_reports() -> st.SearchStrategy[bytes]:
    """HEALTH_REPORT bodies a worker may send: well-formed ones with any field replaced by
    any value, and anything at all."""
    field = st.sampled_from(["status", "detail", "count", "durations", "took"])
    valid = st.fixed_dictionaries(
        {
            "status": st.sampled_from([None, "healthy", "degraded", "unhealthy", "failed"]),
            "detail": st.text(max_size=20),
            "count": st.integers(0, 2**32 - 1),
            "durations": st.floats(0, 1e6),
            "took": st.floats(0, 10),
        },
        optional={"again": st.booleans()},
    )
    spoiled = st.builds(lambda d, k, v: {**d, k: v}, valid, field, msgpack_values)
    return (valid | spoiled | msgpack_values).map(msgpack.packb) | st.binary(max_size=100)


@FUZZ
@given(health_reports())
def test_health_reports_parse_or_are_refused(body: bytes) -> None:
    report = parse_report(body)  # a bad one is None: judged unhealthy, never a crash
    if report is not None:
        status, detail, count, durations, took = report
        assert status is None or status.value in ("healthy", "degraded", "unhealthy")
        assert 0 <= count < 2**32 and len(detail) <= 1024
        assert math.isfinite(durations) and durations >= 0
        assert took is None or (math.isfinite(took) and took >= 0)


@FUZZ
@given(
    st.binary(max_size=300)
    | st.builds(
        lambda cmd, args: f'{{"cmd": {cmd!r}, "args": {args}}}'.encode(),
        st.text(max_size=10),
        st.sampled_from(["{}", "[]", "null", '{"a": 1}', '"x"', "{"]),
    )
)
def test_control_lines_decode_or_raise_bad_request(line: bytes) -> None:
    try:
        request = decode_request(line)
    except BadRequest:
        return
    assert isinstance(request.cmd, str) and isinstance(request.args, dict)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_the_line_splitter_never_loses_a_byte(chunks: list[bytes]) -> None:
    splitter = LineSplitter(max_line=256)
    lines: list[bytes] = []
    try:
        for chunk in chunks:
            lines += splitter.feed(chunk)
    except BadRequest:
        return  # an over-long line: refused
    joined = b"".join(chunks)
    complete = joined[: joined.rfind(b"\n") + 1] if b"\n" in joined else b""
    assert b"".join(line + b"\n" for line in lines) == complete


toml_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
KEYS = [
    "entry",
    "path",
    "version",
    "instances",
    "restart",
    "shutdown_timeout",
    "health_check",
    "limits",
    "sandbox",
    "backoff",
    "config",
    "watch",
    "rollout",
    "update",
    "critical",
    "bogus",
]


def _toml(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


plugin_tables = st.dictionaries(
    st.sampled_from(KEYS),
    toml_scalars
    | st.dictionaries(
        st.sampled_from(["interval", "timeout", "level", "x"]), toml_scalars, max_size=3
    )
    | st.lists(toml_scalars, max_size=3),
    max_size=6,
)


@FUZZ
@given(plugin_tables, st.text(max_size=60))
def test_config_files_load_or_raise_config_error(
    tmp_path_factory: pytest.TempPathFactory, table: dict[str, object], noise: str
) -> None:
    folder = tmp_path_factory.mktemp("cfg")
    text = "[plugins.echo]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
    for body in (text, text + noise):
        path = folder / "osk.toml"
        path.write_text(body)
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.file.endswith("osk.toml")
            assert exc.reason


MANIFEST_KEYS = [
    "name",
    "version",
    "entry",
    "provides",
    "requires",
    "offline_capable",
    "compatibility",
    "breaking_changes",
    "other",
]


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(MANIFEST_KEYS),
        toml_scalars
        | st.lists(
            st.dictionaries(st.sampled_from(["name", "range", "type"]), toml_scalars, max_size=3),
            max_size=3,
        ),
        max_size=7,
    )
)
def test_manifests_load_or_raise_config_error(
    tmp_path_factory: pytest.TempPathFactory, table: dict[str, object]
) -> None:
    folder = tmp_path_factory.mktemp("manifest")
    lines = []
    for key, value in table.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += [
                f"[[{key}]]\n" + "".join(f"{k} = {_toml(x)}\n" for k, x in v.items()) for v in value
            ]
        else:
            lines.insert(0, f"{key} = {_toml(value)}\n")
    text = "".join(lines)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        pass
    (Path(folder) / "osk-plugin.toml").write_text(text)
    try:
        load_manifest(folder)
    except ConfigError as exc:
        assert exc.reason
