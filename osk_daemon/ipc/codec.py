"""The wire format between the daemon, its plugins and outside callers.

A message is two ZeroMQ frames, ``[header, body]`` (the broker's ROUTER sees a third,
the peer's routing id, in front). The header is a small msgpack array that the broker
reads to route; the body is opaque bytes that the broker forwards untouched.

    header = [PROTO, kind, id, target, method, deadline, meta]

- ``kind``: a ``Kind`` below.
- ``id``: request id chosen by the sender, echoed in the reply (0 when unused).
- ``target``: plugin name for requests, "" otherwise.
- ``method``: the RPC method, event name or "" .
- ``deadline``: absolute CLOCK_MONOTONIC seconds (one host, one clock), 0.0 = none.
- ``meta``: a small map (version pin, trace context, reply status) or nil.

This module is the only place where frames are decoded; everything unknown or malformed
raises ``FrameError`` here and is dropped by the caller.
"""

from __future__ import annotations

import datetime as _dt
import enum
from typing import Any, NamedTuple

import msgpack

from osk_daemon.errors import FrameError

PROTO = 1
MAX_HEADER_SIZE = 4096
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> daemon; body {plugin, instance, token, pid, methods}
    READY = 2  # worker -> daemon; start() returned
    HEARTBEAT = 3  # worker -> daemon; sent by the plugin's event loop
    REQUEST = 4  # caller -> daemon -> worker; body = packed args
    REPLY = 5  # worker -> daemon -> caller; body = packed result
    ERROR = 6  # worker or daemon -> caller; body = packed error (OskError.to_wire)
    EVENT = 7  # worker -> daemon, or daemon -> worker (dependency_down/up); method = name
    HEALTH = 8  # daemon -> worker; id = check id
    HEALTH_REPLY = 9  # worker -> daemon; body = {status, detail}
    STOP = 10  # daemon -> worker; run stop() and exit
    START_FAILED = 11  # worker -> daemon; body = packed error


_KINDS = {int(k): k for k in Kind}
_MAX_ID = 2**63


class Header(NamedTuple):
    """A decoded header. A NamedTuple: immutable, and cheap to build on the hot path."""

    kind: Kind
    id: int = 0
    target: str = ""
    method: str = ""
    deadline: float = 0.0
    meta: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return encode_header(self.kind, self.id, self.target, self.method, self.deadline, self.meta)


def encode_header(
    kind: Kind,
    id: int = 0,
    target: str = "",
    method: str = "",
    deadline: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> bytes:
    data: bytes = msgpack.packb(
        [PROTO, int(kind), id, target, method, float(deadline), meta], use_bin_type=True
    )
    return data


def _reject_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not accepted")


def decode_header(data: bytes) -> Header:
    """Decode and validate a header frame. Raises FrameError on anything unexpected."""
    if len(data) > MAX_HEADER_SIZE:
        raise FrameError(f"header of {len(data)} bytes exceeds {MAX_HEADER_SIZE}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"header is not valid msgpack: {exc}") from exc
    if type(raw) is not list or len(raw) != 7:
        raise FrameError("header must be a 7-element array")
    proto, kind, id_, target, method, deadline, meta = raw
    kind_member = _KINDS.get(kind) if type(kind) is int else None
    if (
        proto == PROTO
        and kind_member is not None
        and type(id_) is int
        and 0 <= id_ < _MAX_ID
        and type(target) is str
        and type(method) is str
        and (type(deadline) is float or type(deadline) is int)
        and (meta is None or type(meta) is dict)
    ):
        return Header(kind_member, id_, target, method, float(deadline), meta)
    raise FrameError(_what_is_wrong(proto, kind, id_, target, method, deadline, meta))


def _what_is_wrong(
    proto: Any, kind: Any, id_: Any, target: Any, method: Any, deadline: Any, meta: Any
) -> str:
    if proto != PROTO:
        return f"unsupported protocol version {proto!r} (this daemon speaks {PROTO})"
    if type(kind) is not int or kind not in _KINDS:
        return f"unknown message kind {kind!r}"
    if type(id_) is not int or not 0 <= id_ < _MAX_ID:
        return f"bad request id {id_!r}"
    if not isinstance(target, str) or not isinstance(method, str):
        return "target and method must be strings"
    if type(deadline) not in (int, float):
        return f"bad deadline {deadline!r}"
    return "meta must be a map or nil"


def _default(obj: Any) -> Any:
    if isinstance(obj, _dt.datetime | _dt.date | _dt.time):
        return obj.isoformat()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def pack(value: Any) -> bytes:
    """Pack a body. Raises TypeError for values msgpack cannot carry."""
    data: bytes = msgpack.packb(value, use_bin_type=True, default=_default)
    return data


def unpack(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Any:
    """Unpack a body with limits. Raises FrameError on malformed or oversized input."""
    if len(data) > max_size:
        raise FrameError(f"body of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        return None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_reject_ext)
    except FrameError:
        raise
    except Exception as exc:
        raise FrameError(f"body is not valid msgpack: {exc}") from exc


def split_router_frames(frames: list[bytes]) -> tuple[bytes, Header, bytes]:
    """Split ``[routing_id, header, body]`` as received on a ROUTER socket."""
    if len(frames) != 3:
        raise FrameError(f"expected 3 frames on the broker socket, got {len(frames)}")
    routing_id, header, body = frames
    return routing_id, decode_header(header), body


def split_dealer_frames(frames: list[bytes]) -> tuple[Header, bytes]:
    """Split ``[header, body]`` as received on a DEALER socket."""
    if len(frames) != 2:
        raise FrameError(f"expected 2 frames, got {len(frames)}")
    return decode_header(frames[0]), frames[1]
