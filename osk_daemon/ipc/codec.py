"""The wire format between the daemon, its plugins and outside callers.

A logical message is two ZeroMQ frames, ``[header, body]``. The header says what the
message is; the body is opaque bytes that the broker forwards untouched. One ZeroMQ
message carries one such pair or a *batch* of them, ``[header, body, header, body, ...]``
(at most ``MAX_BATCH`` pairs); on the broker's ROUTER sockets the peer's routing id comes
first. Batches exist for throughput: ZeroMQ wakes its I/O thread once per message, not
per frame, so the RPC kinds (REQUEST, REPLY, ERROR) that leave in the same loop pass go
out together; everything else is sent one pair per message. A receiver handles the pairs
of a batch in order; a message whose frames do not split into pairs is dropped whole.

A header has one of two forms:

- the general form, a msgpack array ``[PROTO, kind, id, target, method, deadline, meta]``:
  - ``kind``: a ``Kind`` below.
  - ``id``: request id chosen by the sender, echoed in the reply (0 when unused).
  - ``target``: plugin name for requests, "" otherwise.
  - ``method``: the RPC method, event name or "" .
  - ``deadline``: absolute CLOCK_MONOTONIC seconds (one host, one clock), 0.0 = none.
  - ``meta``: a small map (version pin, trace context, reply status) or nil.
- the reply form, 11 fixed bytes ``0xC1, PROTO, kind, id (u64 little-endian)``, for REPLY
  and ERROR, whose headers carry nothing but the kind and the id. 0xC1 is the one byte
  msgpack never uses, so the two forms cannot be confused; the broker reads a reply's
  routing information with one ``struct`` call instead of a msgpack decode.

This module is the only place where frames are decoded; everything unknown or malformed
raises ``FrameError`` here and is dropped by the caller. ``Encoder`` is the fast way to
encode on a hot path (it reuses its msgpack packers, so it belongs to one thread).
"""

from __future__ import annotations

import datetime as _dt
import enum
import struct
from typing import Any, NamedTuple

import msgpack

from osk_daemon.errors import FrameError

PROTO = 2  # 2: batches and the reply form
MAX_HEADER_SIZE = 4096
MAX_BATCH = 1024  # pairs in one ZeroMQ message that a receiver accepts
SEND_BATCH = 64  # pairs a sender puts in one message at most (more: the stages overlap less)
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
    HEALTH_REPORT = 12  # worker -> daemon; its own check (worker.health); body = its result
    # worker -> daemon: ready to import its hand-over state (empty body); daemon -> worker:
    # the state as the previous version exported it (packed), or an empty body for none
    STATE = 13


_KINDS = {int(k): k for k in Kind}
_MAX_ID = 2**63
_REPLY_MARK = 0xC1
_REPLY_FORM = struct.Struct("<BBBQ")
REPLY_FORM_SIZE = _REPLY_FORM.size
_REPLY_KINDS = {int(Kind.REPLY): Kind.REPLY, int(Kind.ERROR): Kind.ERROR}
_REQUEST = int(Kind.REQUEST)
_new_header = tuple.__new__


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
    """A header in the general form (any kind)."""
    data: bytes = msgpack.packb(
        [PROTO, int(kind), id, target, method, float(deadline), meta], use_bin_type=True
    )
    return data


def encode_reply_header(kind: Kind, id: int) -> bytes:
    """A REPLY or ERROR header in the reply form. Raises ValueError for other kinds."""
    if kind is not Kind.REPLY and kind is not Kind.ERROR:
        raise ValueError(f"{kind.name} has no reply form")
    return _REPLY_FORM.pack(_REPLY_MARK, PROTO, kind, id)


def decode_reply_header(data: bytes) -> tuple[Kind, int] | None:
    """``(kind, id)`` of a header in the reply form; None if ``data`` is in the general
    form (decode that with ``decode_header``). Raises FrameError for a broken reply form.
    Cost: one ``struct`` unpack, for the broker's reply path."""
    if not data or data[0] != _REPLY_MARK:
        return None
    if len(data) != REPLY_FORM_SIZE:
        raise FrameError(f"reply header of {len(data)} bytes (the reply form has 11)")
    _, proto, kind, id_ = _REPLY_FORM.unpack(data)
    member = _REPLY_KINDS.get(kind)
    if proto != PROTO or member is None or id_ >= _MAX_ID:
        raise FrameError(_what_is_wrong(proto, kind, id_, "", "", 0.0, None))
    return member, id_


def _reject_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not accepted")


def decode_header(data: bytes) -> Header:
    """Decode and validate a header frame (either form). Raises FrameError on anything
    unexpected."""
    if len(data) > MAX_HEADER_SIZE:
        raise FrameError(f"header of {len(data)} bytes exceeds {MAX_HEADER_SIZE}")
    if data[:1] == b"\xc1":
        kind_id = decode_reply_header(data)
        assert kind_id is not None
        return _new_header(Header, (kind_id[0], kind_id[1], "", "", 0.0, None))
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=False
        )
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"header is not valid msgpack: {exc}") from exc
    if type(raw) is not tuple or len(raw) != 7:
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
        return _new_header(Header, (kind_member, id_, target, method, float(deadline), meta))
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
    if meta is not None and type(meta) is not dict:
        return "meta must be a map or nil"
    return f"{Kind(kind).name} has no reply form"


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


class Encoder:
    """``encode_header``, ``encode_reply_header`` and ``pack`` with reused msgpack packers.

    ``msgpack.packb`` builds a packer (and its buffer) on every call, which costs about as
    much as the packing; an ``Encoder`` keeps two. A packer is not safe to share between
    threads, so an ``Encoder`` belongs to one owner on one thread (the broker's loop, a
    worker's loop, one ``Client``). Same output and errors as the module functions.
    """

    __slots__ = ("_body", "_header")

    def __init__(self) -> None:
        self._header = msgpack.Packer(use_bin_type=True).pack
        self._body = msgpack.Packer(use_bin_type=True, default=_default).pack

    def request(
        self, id: int, target: str, method: str, deadline: float, meta: dict[str, Any] | None
    ) -> bytes:
        """A REQUEST header (general form)."""
        data: bytes = self._header((PROTO, _REQUEST, id, target, method, float(deadline), meta))
        return data

    def header(
        self,
        kind: Kind,
        id: int = 0,
        target: str = "",
        method: str = "",
        deadline: float = 0.0,
        meta: dict[str, Any] | None = None,
    ) -> bytes:
        """A header of any kind in the general form."""
        data: bytes = self._header((PROTO, int(kind), id, target, method, float(deadline), meta))
        return data

    reply = staticmethod(encode_reply_header)

    def body(self, value: Any) -> bytes:
        """Pack a body. Raises TypeError for values msgpack cannot carry."""
        data: bytes = self._body(value)
        return data


def check_batch(frames: list[bytes], first: int) -> int:
    """How many ``(header, body)`` pairs ``frames[first:]`` holds (``first``: 1 after a
    routing id, else 0). Raises FrameError unless they split into 1..MAX_BATCH pairs."""
    n = len(frames) - first
    if n < 2 or n & 1 or n > 2 * MAX_BATCH:
        raise FrameError(
            f"expected 1 to {MAX_BATCH} (header, body) pairs"
            f"{' after the routing id' if first else ''}, got {max(n, 0)} frames"
        )
    return n >> 1


def split_router_frames(frames: list[bytes]) -> tuple[bytes, Header, bytes]:
    """Split ``[routing_id, header, body]`` (one pair) as received on a ROUTER socket."""
    if len(frames) != 3:
        raise FrameError(f"expected 3 frames on the broker socket, got {len(frames)}")
    routing_id, header, body = frames
    return routing_id, decode_header(header), body


def split_dealer_frames(frames: list[bytes]) -> tuple[Header, bytes]:
    """Split ``[header, body]`` (one pair) as received on a DEALER socket."""
    if len(frames) != 2:
        raise FrameError(f"expected 2 frames, got {len(frames)}")
    return decode_header(frames[0]), frames[1]


def split_batch(frames: list[bytes], first: int = 0) -> list[tuple[Header, bytes]]:
    """Every ``(header, body)`` of a message, from ``frames[first]`` on (1 after a routing
    id). Raises FrameError if the frames do not split into pairs or a header is bad."""
    check_batch(frames, first)
    return [(decode_header(frames[i]), frames[i + 1]) for i in range(first, len(frames), 2)]


def routing_meta(
    version: str | None = None, key: str | None = None, instance: int | None = None
) -> dict[str, Any] | None:
    """A request header's routing fields (``ipc.routing.pick``): ``version`` pins the
    version, ``key`` sticks to one version (consistent hashing, e.g. a user id, for A/B),
    ``instance`` prefers that instance; None when none is given."""
    meta: dict[str, Any] = {}
    if version:
        meta["version"] = version
    if key is not None:
        meta["key"] = key
    if instance is not None:
        meta["instance"] = instance
    return meta or None
