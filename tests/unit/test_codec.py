"""The frame codec accepts what it should and rejects everything else with FrameError."""

from __future__ import annotations

import datetime as dt

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from osk_daemon.errors import FrameError
from osk_daemon.ipc.codec import (
    MAX_HEADER_SIZE,
    Header,
    Kind,
    decode_header,
    encode_header,
    pack,
    split_dealer_frames,
    split_router_frames,
    unpack,
)

pytestmark = pytest.mark.timeout(30)


def test_header_round_trip() -> None:
    h = Header(Kind.REQUEST, 7, "echo", "echo", 123.5, {"version": "1.0.0"})
    assert decode_header(h.encode()) == h


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 4, 1, "a", "b", 0.0]),  # 6 elements
        msgpack.packb([2, 4, 1, "a", "b", 0.0, None]),  # protocol 2
        msgpack.packb([1, 99, 1, "a", "b", 0.0, None]),  # unknown kind
        msgpack.packb([1, 4, -1, "a", "b", 0.0, None]),  # negative id
        msgpack.packb([1, 4, 1, 5, "b", 0.0, None]),  # target not a string
        msgpack.packb([1, 4, 1, "a", "b", "soon", None]),  # bad deadline
        msgpack.packb([1, 4, 1, "a", "b", 0.0, [1]]),  # meta not a map
        msgpack.packb([1, 4, 1, "a", "b", 0.0, msgpack.ExtType(1, b"x")]),
        msgpack.packb({"kind": 4}),
        b"\x00" * (MAX_HEADER_SIZE + 1),
    ],
)
def test_bad_headers_raise_frame_error(raw: bytes) -> None:
    with pytest.raises(FrameError):
        decode_header(raw)


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_frame_error(raw: bytes) -> None:
    try:
        decode_header(raw)
    except FrameError:
        pass
    try:
        unpack(raw)
    except FrameError:
        pass


def test_body_limits() -> None:
    assert unpack(pack({"a": [1, 2]})) == {"a": [1, 2]}
    assert unpack(b"") is None
    with pytest.raises(FrameError, match="exceeds"):
        unpack(pack("x" * 100), max_size=50)


def test_pack_converts_datetimes_and_refuses_objects() -> None:
    assert unpack(pack(dt.date(2026, 11, 25))) == "2026-11-25"
    with pytest.raises(TypeError, match="cannot send"):
        pack(object())


def test_frame_splitting() -> None:
    header = encode_header(Kind.HEARTBEAT)
    rid, h, body = split_router_frames([b"id", header, b""])
    assert (rid, h.kind, body) == (b"id", Kind.HEARTBEAT, b"")
    assert split_dealer_frames([header, b"x"])[1] == b"x"
    with pytest.raises(FrameError):
        split_router_frames([b"id", header])
    with pytest.raises(FrameError):
        split_dealer_frames([header])
