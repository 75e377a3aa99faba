"""Collect a plugin process's stdout and stderr as log lines.

Why: plugins print; the operator wants those lines in the daemon's log, in ``oskctl logs``
(recent lines) and ``oskctl logs --follow`` (a live stream), tagged with plugin, instance
and stream. Nothing a plugin prints may block or flood the daemon.

How: ``OutputPipes`` makes one pipe per stream. The write ends go to the spawner (they become
the child's fds 1 and 2; the caller closes its copies once the child is spawned, so EOF
arrives when the child and its own children are gone).

A plugin must outlive the daemon (it is re-adopted after a restart), and so must its
output: the daemon's supervised instances get *named* pipes (FIFOs) in the runtime dir
instead, one per stream, and the child's end is opened read-write. The child is then a
reader of its own pipe too, so while no daemon reads it a write never fails with EPIPE: the
lines wait in the pipe (1 MiB for a root daemon, else the default 64 KiB) and a writer
blocks once it is full.
A restarted daemon opens the same FIFOs by name (``adopt=True``) and reads on from where
the dead one stopped. The FIFO files are removed once both streams reached EOF.

The read ends are non-blocking and read with ``loop.add_reader``; bytes are split into
lines (a partial line waits for the rest, a line longer than ``MAX_LINE`` bytes is cut
into pieces at a UTF-8 boundary), decoded with ``errors="replace"``, logged to
``osk.plugin.<name>`` and appended to the plugin's ``LogRing``. The ring keeps the last
lines in a deque and copies each new line to its subscribers' bounded queues; a subscriber
that falls behind loses lines, the daemon never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osk_daemon.supervisor import unlinker

__all__ = ["MAX_LINE", "LogLine", "LogRing", "OutputPipes", "open_output", "output_fifos"]

MAX_LINE = 64 * 1024
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a plugin process wrote; ``ts`` is wall-clock ``time.time()`` at read."""

    ts: float
    plugin: str
    instance: int
    stream: str
    line: str


class LogRing:
    """The last ``maxlen`` lines of one plugin (all instances), plus live subscribers."""

    def __init__(self, maxlen: int = 1000, *, queue_size: int = 1000) -> None:
        self._lines: deque[LogLine] = deque(maxlen=maxlen)
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[LogLine]] = set()
        self.dropped = 0  # lines subscribers lost because their queue was full

    def __len__(self) -> int:
        return len(self._lines)

    def append(self, line: LogLine) -> None:
        """Keep ``line`` and offer it to every subscriber (dropped where a queue is full)."""
        self._lines.append(line)
        for queue in self._subscribers:
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:
                self.dropped += 1

    def tail(self, n: int | None = None) -> list[LogLine]:
        """The last ``n`` lines, oldest first (all kept lines when ``n`` is ``None``)."""
        if n is None:
            return list(self._lines)
        if n <= 0:
            return []
        return list(self._lines)[-n:]

    def subscribe(self) -> asyncio.Queue[LogLine]:
        """A bounded queue that receives every line appended from now on."""
        queue: asyncio.Queue[LogLine] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LogLine]) -> None:
        """Stop feeding ``queue``; unknown queues are ignored."""
        self._subscribers.discard(queue)


def _utf8_cut(buf: bytearray, limit: int) -> int:
    """A cut point <= ``limit`` that does not split a UTF-8 sequence (if one is near)."""
    cut = limit
    while cut > limit - 3 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if (buf[cut] & 0xC0) != 0x80 else limit


class _LineSplitter:
    """Bytes in, complete lines out; holds the partial last line."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        while self._buf:
            nl = self._buf.find(b"\n", 0, self._max + 1)
            if nl >= 0:
                lines.append(bytes(self._buf[:nl]))
                del self._buf[: nl + 1]
            elif len(self._buf) > self._max:
                cut = _utf8_cut(self._buf, self._max)
                lines.append(bytes(self._buf[:cut]))
                del self._buf[:cut]
            else:
                break
        return lines

    def flush(self) -> list[bytes]:
        rest = bytes(self._buf)
        self._buf.clear()
        return [rest] if rest else []


class OutputPipes:
    """The stdout and stderr pipes of one plugin instance's process.

    ``stdout_w``/``stderr_w`` are the write ends for the child; the caller owns them and
    closes them after spawning (or on a failed spawn). The read ends are owned here and
    closed on EOF or by ``close()``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        plugin: str,
        instance: int,
        ring: LogRing,
        logger: logging.Logger | None = None,
        *,
        fifos: tuple[Path, Path] | None = None,
        adopt: bool = False,
    ) -> None:
        """``fifos``: named pipes (stdout, stderr) instead of anonymous ones; ``adopt``:
        they exist and a live process writes them (no write ends are made: -1)."""
        self._loop = loop
        self._plugin = plugin
        self._instance = instance
        self._ring = ring
        self._log = logger or logging.getLogger(f"osk.plugin.{plugin}")
        self._readers: dict[int, tuple[str, _LineSplitter]] = {}
        self._closed = asyncio.Event()
        self._fifos = fifos
        write_ends: list[int] = []
        try:
            for i, stream in enumerate(("stdout", "stderr")):
                if fifos is None:
                    r, w = os.pipe2(os.O_CLOEXEC)
                else:
                    r, w = _open_fifo(fifos[i], create=not adopt)
                self._readers[r] = (stream, _LineSplitter())
                write_ends.append(w)
                os.set_blocking(r, False)
            for fd in self._readers:
                loop.add_reader(fd, self._on_readable, fd)
        except BaseException:
            for fd in write_ends:
                if fd >= 0:
                    os.close(fd)
            self.close()
            raise
        self.stdout_w, self.stderr_w = write_ends

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once both streams reached EOF (or ``close()`` was called)."""
        await self._closed.wait()

    def close(self) -> None:
        """Stop reading now: flush partial lines, close the read ends. Idempotent."""
        for fd in list(self._readers):
            self._finish(fd)

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._log.warning("[%s/%d] output read failed: %s", self._plugin, self._instance, exc)
            self._finish(fd)
            return
        if not data:
            self._finish(fd)
            return
        stream, splitter = self._readers[fd]
        for raw in splitter.feed(data):
            self._emit(stream, raw)

    def _finish(self, fd: int) -> None:
        entry = self._readers.pop(fd, None)
        if entry is None:
            return
        stream, splitter = entry
        self._loop.remove_reader(fd)
        os.close(fd)
        for raw in splitter.flush():
            self._emit(stream, raw)
        if not self._readers:
            self._closed.set()
            for path in self._fifos or ():
                unlinker.remove(path)  # off the loop: milliseconds on a disk-backed dir

    def _emit(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").removesuffix("\r")
        self._log.info(
            "[%s/%d] %s",
            self._plugin,
            self._instance,
            text,
            extra={"plugin": self._plugin, "instance": self._instance, "stream": stream},
        )
        self._ring.append(LogLine(time.time(), self._plugin, self._instance, stream, text))


_PIPE_SIZE = 1 << 20  # what a FIFO holds while no daemon reads it (the default max)


def _open_fifo(path: Path, *, create: bool) -> tuple[int, int]:
    """``(read end, write end)`` of the FIFO at ``path``: the read end non-blocking for
    the daemon, the write end read-write for the child (-1 when adopting)."""
    if create:
        path.unlink(missing_ok=True)
        os.mkfifo(path, 0o600)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not create:
        return r, -1
    try:
        w = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        os.close(r)
        raise
    if os.geteuid() == 0:
        # Root only: for another user the kernel counts every pipe's pages against
        # pipe-user-pages-soft (64 MiB), so 1 MiB FIFOs would use it up at ~32 instances
        # and shrink every later pipe of that user (its plugins' included) to one page.
        # Elsewhere a FIFO keeps the default 64 KiB of slack.
        with contextlib.suppress(OSError):  # a smaller pipe only means less slack
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    return r, w


def output_fifos(directory: Path, plugin: str, instance: int, token: str) -> tuple[Path, Path]:
    """Where one life of an instance writes its stdout and stderr."""
    stem = f"{plugin}-{instance}-{token[:12]}"
    return directory / f"{stem}.out", directory / f"{stem}.err"


def open_output(
    loop: asyncio.AbstractEventLoop,
    plugin: str,
    instance: int,
    ring: LogRing,
    fifos: tuple[Path, Path] | None = None,
    *,
    adopt: bool = False,
) -> tuple[int, int, Callable[[], None]]:
    """Open an instance's output pipes: ``(stdout_w, stderr_w, close)``.

    The caller closes the two write ends after the spawn (there are none, -1, when
    ``adopt``); ``close`` stops reading at once (normally reading ends by itself at EOF).
    Raises ``OSError`` if the pipes cannot be made or opened.
    """
    pipes = OutputPipes(loop, plugin, instance, ring, fifos=fifos, adopt=adopt)
    return pipes.stdout_w, pipes.stderr_w, pipes.close
