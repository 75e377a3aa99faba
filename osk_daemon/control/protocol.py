"""The control-socket wire format, shared by the daemon and ``oskctl``.

Why: the daemon and its command-line client must agree byte for byte, and malformed input
must be rejected in exactly one place. This module is that place; it is sans-I/O (no
sockets, no anyio) and standard-library only, so ``oskctl`` can import it and still start
fast.

How: newline-delimited JSON over an AF_UNIX stream socket. Each line is one UTF-8 JSON
object.

    request:  {"cmd": "status", "args": {"plugin": null}}
    reply:    {"ok": true, "result": ...}
              {"ok": false, "error": {"code": "unavailable", "message": "..."}}
    stream:   {"stream": item}  (zero or more), then a final reply as above

A connection carries any number of requests; they are answered in order. A request line
longer than ``MAX_REQUEST_LINE`` bytes is answered with ``bad_request`` and the connection
is closed, since the server cannot tell where the next request starts. ``LineSplitter``
turns received chunks into lines and enforces that limit on either side.
"""

from __future__ import annotations

import json

from osk_daemon.errors import ControlError, OskError

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean
if TYPE_CHECKING:
    from typing import Any

MAX_REQUEST_LINE = 1024 * 1024
MAX_REPLY_LINE = 64 * 1024 * 1024

_REQUEST_KEYS = frozenset({"cmd", "args"})


class BadRequest(ControlError):
    """A request line is not valid JSON, not UTF-8, or not shaped like a request."""

    code = "bad_request"


class LineTooLong(BadRequest):
    """More than ``limit`` bytes arrived without a newline; the stream cannot be resynced."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"line longer than {limit} bytes; send one JSON object per line")


class Forbidden(ControlError):
    """The peer's credentials do not allow it to use the control socket."""

    code = "forbidden"


class BadReply(ControlError):
    """The daemon answered with something that is not a valid reply line."""

    code = "bad_reply"


class _Value:
    """A small immutable value, equal to one of the same class with equal fields.

    Not a dataclass: ``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``,
    ``tokenize``), ~8 ms of every ``oskctl`` start for four tiny classes.
    """

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in type(self).__slots__)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Value)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        pairs = zip(type(self).__slots__, self._fields(), strict=True)
        fields = ", ".join(f"{name}={value!r}" for name, value in pairs)
        return f"{type(self).__name__}({fields})"


class Request(_Value):
    __slots__ = ("args", "cmd")
    cmd: str
    args: dict[str, Any]

    def __init__(self, cmd: str, args: dict[str, Any]) -> None:
        object.__setattr__(self, "cmd", cmd)
        object.__setattr__(self, "args", args)


class Result(_Value):
    """The final, successful reply to a request (``value`` may be ``None``)."""

    __slots__ = ("value",)
    value: Any

    def __init__(self, value: Any) -> None:
        object.__setattr__(self, "value", value)


class StreamItem(_Value):
    """One item of a streaming reply; more lines follow."""

    __slots__ = ("item",)
    item: Any

    def __init__(self, item: Any) -> None:
        object.__setattr__(self, "item", item)


class ErrorReply(_Value):
    """The final, failed reply to a request."""

    __slots__ = ("code", "message")
    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "message", message)


Reply = Result | StreamItem | ErrorReply


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _load(line: bytes) -> Any:
    """Parse one line; raises ``UnicodeDecodeError`` or ``ValueError``."""
    return json.loads(line.decode("utf-8"))


# -- client -> server -------------------------------------------------------------------------


def encode_request(cmd: str, args: dict[str, Any] | None = None) -> bytes:
    """One request line, newline included. Raises ``TypeError`` if ``args`` is not JSON-able."""
    return _dump({"cmd": cmd, "args": args if args is not None else {}})


def decode_request(line: bytes) -> Request:
    """Parse one request line (with or without its newline).

    Raises ``BadRequest`` for non-UTF-8 bytes, invalid JSON, a missing or empty ``cmd``,
    ``args`` that is not an object, or unknown top-level keys. A missing ``args`` means ``{}``.
    """
    try:
        obj = _load(line)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except ValueError as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadRequest(f"request must be a JSON object, got {type(obj).__name__}")
    unknown = obj.keys() - _REQUEST_KEYS
    if unknown:
        raise BadRequest(f"unknown request keys: {', '.join(sorted(unknown))}")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise BadRequest('request needs "cmd", a non-empty string')
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest(f'"args" must be a JSON object, got {type(args).__name__}')
    return Request(cmd, args)


# -- server -> client -------------------------------------------------------------------------


def encode_result(value: Any) -> bytes:
    """The final success line. Raises ``TypeError``/``ValueError`` if ``value`` is not JSON-able."""
    return _dump({"ok": True, "result": value})


def encode_stream_item(item: Any) -> bytes:
    """One stream line. Raises ``TypeError``/``ValueError`` if ``item`` is not JSON-able."""
    return _dump({"stream": item})


def encode_error(code: str, message: str) -> bytes:
    """The final failure line."""
    return _dump({"ok": False, "error": {"code": code, "message": message}})


def encode_exception(exc: OskError) -> bytes:
    """The final failure line for an ``OskError``: its ``code`` and its message."""
    return encode_error(exc.code, str(exc))


def decode_reply(line: bytes) -> Reply:
    """Parse one reply line. Raises ``BadReply`` for anything that is not a valid reply."""
    try:
        obj = _load(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadReply(f"daemon sent an unreadable line: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadReply(f"daemon sent a {type(obj).__name__}, not an object")
    if "stream" in obj and len(obj) == 1:
        return StreamItem(obj["stream"])
    ok = obj.get("ok")
    if ok is True:
        return Result(obj.get("result"))
    if ok is False:
        error = obj.get("error")
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message", "")
            if isinstance(code, str) and isinstance(message, str):
                return ErrorReply(code, message)
        raise BadReply(f"daemon sent a malformed error: {error!r:.200}")
    raise BadReply(f"daemon sent a line that is not a reply: {obj!r:.200}")


# -- framing ----------------------------------------------------------------------------------


class LineSplitter:
    """Turns received byte chunks into complete lines (newline stripped).

    ``feed`` returns the lines completed by a chunk and keeps the rest. It raises
    ``LineTooLong`` once more than ``max_line`` bytes are buffered without a newline; the
    splitter is then unusable. Cost: linear in the bytes fed (each byte is scanned once).
    """

    def __init__(self, max_line: int = MAX_REQUEST_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete line."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", max(start, self._scanned))
            if end < 0:
                break
            if end - start > self.max_line:
                raise LineTooLong(self.max_line)
            lines.append(bytes(self._buf[start:end]))
            start = end + 1
        del self._buf[:start]
        self._scanned = len(self._buf)
        if len(self._buf) > self.max_line:
            raise LineTooLong(self.max_line)
        return lines
