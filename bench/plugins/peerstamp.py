import time

STARTED = time.monotonic()  # the first line of code after the import: the stamp
"""The child of ``bench/peers.py``: the same file under every supervisor.

Its first line records ``time.monotonic()`` (CLOCK_MONOTONIC, system-wide); then it appends
``"<pid> <started>"`` to the file named by ``$OSK_PEER_STAMP`` (one ``write`` on an
``O_APPEND`` fd, so lines never interleave). Run as a script (supervisord, circus, PM2, s6)
it then sleeps until killed; if ``$OSK_PEER_NOTIFY_FD`` is set it first writes a newline to
that fd (s6's readiness notification). Imported by osk-daemon's worker (``peerstamp:Idle``),
the module-level code is the same and ``Idle`` is a plugin that does nothing. With
``$OSK_PEER_STAMP_AT=start`` (osk-daemon with ``standby = true``, whose spare process
imported this module before the crash) the stamp is written by ``Idle.start()`` instead:
the first line of the replacement's plugin code that runs after the crash.
"""

import os  # noqa: E402

_AT_START = os.environ.get("OSK_PEER_STAMP_AT") == "start"


def _stamp(when: float) -> None:
    fd = os.open(os.environ["OSK_PEER_STAMP"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()} {when!r}\n".encode())
    os.close(fd)


if not _AT_START:
    _stamp(STARTED)

if __name__ == "__main__":
    import signal

    notify = os.environ.get("OSK_PEER_NOTIFY_FD")
    if notify:
        os.write(int(notify), b"\n")
        os.close(int(notify))
    while True:
        signal.pause()
else:
    from osk_daemon.worker import Plugin

    class Idle(Plugin):
        async def start(self) -> None:
            if _AT_START:
                _stamp(time.monotonic())
