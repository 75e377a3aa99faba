"""The frame codec accepts what it should and rejects everything else with FrameError."""

from __future__ import annotations

import datetime as dt

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from osk_daemon.errors import FrameError
from osk_daemon.ipc.codec import (
    MAX_BATCH,
    MAX_HEADER_SIZE,
    PROTO,
    Encoder,
    Header,
    Kind,
    check_batch,
    decode_header,
    decode_reply_header,
    encode_header,
    encode_reply_header,
    pack,
    split_batch,
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
        msgpack.packb([PROTO, 4, 1, "a", "b", 0.0]),  # 6 elements
        msgpack.packb([PROTO + 1, 4, 1, "a", "b", 0.0, None]),  # a newer protocol
        msgpack.packb([PROTO - 1, 4, 1, "a", "b", 0.0, None]),  # an older one
        msgpack.packb([PROTO, 99, 1, "a", "b", 0.0, None]),  # unknown kind
        msgpack.packb([PROTO, 4, -1, "a", "b", 0.0, None]),  # negative id
        msgpack.packb([PROTO, 4, 2**63, "a", "b", 0.0, None]),  # id too large
        msgpack.packb([PROTO, 4, 1, 5, "b", 0.0, None]),  # target not a string
        msgpack.packb([PROTO, 4, 1, "a", "b", "soon", None]),  # bad deadline
        msgpack.packb([PROTO, 4, 1, "a", "b", 0.0, [1]]),  # meta not a map
        msgpack.packb([PROTO, 4, 1, "a", "b", 0.0, msgpack.ExtType(1, b"x")]),
        msgpack.packb({"kind": 4}),
        b"\x00" * (MAX_HEADER_SIZE + 1),
        # the reply form: wrong length, protocol, kind, id
        b"\xc1" + bytes([PROTO, 5]) + bytes(7),
        b"\xc1" + bytes([PROTO, 5]) + bytes(9),
        b"\xc1" + bytes([PROTO + 1, 5]) + bytes(8),
        b"\xc1" + bytes([PROTO, int(Kind.REQUEST)]) + bytes(8),
        b"\xc1" + bytes([PROTO, 99]) + bytes(8),
        b"\xc1" + bytes([PROTO, 5]) + (2**63).to_bytes(8, "little"),
    ],
)
def test_bad_headers_raise_frame_error(raw: bytes) -> None:
    with pytest.raises(FrameError):
        decode_header(raw)


def test_each_bad_vector_is_refused_for_its_own_reason() -> None:
    assert "protocol version" in _refusal([PROTO + 1, 4, 1, "a", "b", 0.0, None])
    assert "kind" in _refusal([PROTO, 99, 1, "a", "b", 0.0, None])
    assert "id" in _refusal([PROTO, 4, -1, "a", "b", 0.0, None])
    assert "strings" in _refusal([PROTO, 4, 1, 5, "b", 0.0, None])
    assert "deadline" in _refusal([PROTO, 4, 1, "a", "b", "soon", None])
    assert "meta" in _refusal([PROTO, 4, 1, "a", "b", 0.0, [1]])


def _refusal(header: list[object]) -> str:
    with pytest.raises(FrameError) as info:
        decode_header(msgpack.packb(header))
    return str(info.value)


def test_reply_form() -> None:
    for kind in (Kind.REPLY, Kind.ERROR):
        for id_ in (0, 1, 2**32, 2**63 - 1):
            raw = encode_reply_header(kind, id_)
            assert len(raw) == 11 and raw[0] == 0xC1
            assert decode_reply_header(raw) == (kind, id_)
            assert decode_header(raw) == Header(kind, id_)
    assert decode_reply_header(encode_header(Kind.REPLY, 1)) is None  # the general form
    assert decode_reply_header(b"") is None
    with pytest.raises(ValueError, match="no reply form"):
        encode_reply_header(Kind.REQUEST, 1)
    with pytest.raises(FrameError, match="11"):
        decode_reply_header(b"\xc1\x02")


@given(st.binary(min_size=1, max_size=20))
def test_reply_form_garbage_is_a_frame_error_or_not_the_reply_form(raw: bytes) -> None:
    try:
        decode_reply_header(b"\xc1" + raw)
    except FrameError:
        pass


def test_encoder_matches_the_module_functions() -> None:
    enc = Encoder()
    args = (7, "echo", "echo", 123.5, {"version": "1.0.0"})
    assert enc.request(*args) == encode_header(Kind.REQUEST, *args)
    assert enc.header(Kind.EVENT, 0, "", "x", 0, None) == encode_header(Kind.EVENT, method="x")
    assert enc.reply(Kind.ERROR, 9) == encode_reply_header(Kind.ERROR, 9)
    value = {"a": [1, (2, 3)], "when": dt.date(2026, 11, 25), "s": {1}}
    assert enc.body(value) == pack(value)
    with pytest.raises(TypeError, match="cannot send"):
        enc.body(object())
    assert enc.body([1]) == pack([1])  # a failed pack leaves the packer usable


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


def test_batches() -> None:
    reply = encode_reply_header(Kind.REPLY, 3)
    frames = [encode_header(Kind.REQUEST, 1, "p", "m"), b"a", reply, b"b"]
    assert check_batch(frames, 0) == 2
    assert check_batch([b"rid", *frames], 1) == 2
    pairs = split_batch([b"rid", *frames], 1)
    assert [(h.kind, h.id, body) for h, body in pairs] == [
        (Kind.REQUEST, 1, b"a"),
        (Kind.REPLY, 3, b"b"),
    ]
    for bad, first in [([], 0), ([b"rid"], 1), (frames[:3], 0), ([b"rid", *frames[:3]], 1)]:
        with pytest.raises(FrameError, match="pairs"):
            check_batch(bad, first)
    assert check_batch([reply, b""] * MAX_BATCH, 0) == MAX_BATCH
    with pytest.raises(FrameError):
        check_batch([reply, b""] * (MAX_BATCH + 1), 0)
    with pytest.raises(FrameError):
        split_batch([reply, b"", b"\xc1", b""])
