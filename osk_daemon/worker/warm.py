"""What a warm zygote child makes for a worker before it knows its plugin.

Why: a restart handed to a warm zygote child (``supervisor.zygote``) should not pay for
the worker's generic set-up: the log handler, the ZeroMQ context and the event loop, and
a first pass of that loop (its code paged in, its copy-on-write faults taken). The zygote
calls ``warm_up`` (named ``osk_daemon.worker.runtime:warm_up``, where it is re-exported,
so that targets of ``worker.runtime`` keep what it made) while the child waits for its
request; ``run_worker`` then ``take_prepared`` what was made in this very process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import zmq

from osk_daemon.ipc.codec import Kind, encode_header, pack

__all__ = ["LOG_FORMAT", "Prepared", "rehearse", "take_prepared", "warm_up"]

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class Prepared(NamedTuple):
    """What ``warm_up`` made in this process before it knew its plugin."""

    pid: int
    handler: logging.Handler
    zctx: zmq.Context[Any]
    loop: asyncio.AbstractEventLoop


_prepared: Prepared | None = None


def warm_up() -> tuple[frozenset[int], Callable[[], None]]:
    """The zygote's warm-up hook: make what every worker needs before its plugin is known.

    Runs in a warm zygote child while it waits for a request, unconfined and before any
    plugin is chosen: installs the log handler, creates the zmq context (libzmq starts its
    I/O threads only with the first socket, so no thread runs yet) and the event loop, and
    runs one pass of that loop so its code is already paged in. Imports nothing of any
    plugin. Returns the fds these hold (the zygote keeps them open for ``run_worker``) and
    a function that closes them (for a request of another target). Cost ~1 ms, off the
    restart path.
    """
    global _prepared
    before = _open_fds()
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved = root.handlers[:]
    root.handlers = [handler]
    zctx: zmq.Context[Any] = zmq.Context()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(rehearse())
    _prepared = Prepared(os.getpid(), handler, zctx, loop)

    def release() -> None:
        global _prepared
        _prepared = None
        loop.close()
        zctx.term()
        root.handlers = saved

    return frozenset(_open_fds() - before), release


async def rehearse() -> None:
    """What a worker's start does on its loop, once, on nothing: tasks, a wait, a frame."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    tasks = {loop.create_task(asyncio.sleep(0)), loop.create_task(event.wait())}
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    encode_header(Kind.HELLO, 0, target="warm-up")
    pack({"warm-up": [0, 0.0, "", b""]})
    compile("class _C:\n    def f(self):\n        return {'a': 1}\n", "<warm-up>", "exec")


def _open_fds() -> set[int]:
    """This process's open fds (the listing's own transient fd is not among them)."""
    listed = {int(entry.name) for entry in Path("/proc/self/fd").iterdir()}
    open_fds = set()
    for fd in listed:
        with contextlib.suppress(OSError):
            os.fstat(fd)
            open_fds.add(fd)
    return open_fds


def take_prepared() -> Prepared | None:
    """What ``warm_up`` made, if it made it in this very process (not in a parent)."""
    global _prepared
    prepared, _prepared = _prepared, None
    return prepared if prepared is not None and prepared.pid == os.getpid() else None
