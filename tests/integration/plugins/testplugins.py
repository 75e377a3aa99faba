"""Plugins that misbehave in every way the supervisor must handle (for integration tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from osk_daemon.worker import Health, Plugin, rpc


class Echo(Plugin):
    async def start(self) -> None:
        if self.ctx.config.get("fail_start"):
            raise RuntimeError("refusing to start: fail_start is set")
        self.healthy = True

    async def health(self) -> Health:
        if getattr(self, "health_hangs", False):
            await asyncio.sleep(1000)  # the loop runs on (beats go on); the check never ends
        return Health.healthy() if self.healthy else Health.unhealthy("told to be sick")

    @rpc
    def echo(self, text: str = "") -> dict[str, Any]:
        return {"text": text, "pid": os.getpid(), "instance": self.ctx.instance}

    @rpc
    def pid(self) -> int:
        return os.getpid()

    @rpc
    def say(self, text: str, stream: str = "stdout") -> int:
        print(text, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)
        return self.ctx.instance

    @rpc
    def crash(self, code: int = 1) -> None:
        os._exit(code)

    @rpc
    def kill_self(self, sig: int = signal.SIGKILL) -> None:
        os.kill(os.getpid(), sig)

    @rpc
    def hang(self, seconds: float = 1000.0) -> None:
        time.sleep(seconds)

    @rpc
    def sick(self) -> None:
        self.healthy = False

    @rpc
    def hang_health(self) -> None:
        self.health_hangs = True

    @rpc
    def ignore_sigterm(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.stubborn = True

    async def stop(self) -> None:
        if getattr(self, "stubborn", False):
            time.sleep(1000)  # noqa: ASYNC251 - ignores STOP as well: only SIGKILL ends it

    @rpc
    async def call_other(self, plugin: str, method: str, args: Any = None) -> Any:
        return await self.ctx.call(plugin, method, args, timeout=5)

    @rpc
    def spawn_grandchild(self) -> int:
        pid = os.fork()
        if pid == 0:
            time.sleep(1000)
            os._exit(0)
        return pid


class Confined(Echo):
    """Tries everything a sandbox must refuse, and reports what the kernel said."""

    @rpc
    def hog(self, mib: int = 1024) -> int:
        chunks = [bytearray(1024 * 1024) for _ in range(mib)]  # touched: really allocated
        return len(chunks)

    @rpc
    def fork_bomb(self, n: int = 64) -> dict[str, Any]:
        children, error = [], None
        for _ in range(n):
            try:
                pid = os.fork()
            except OSError as exc:
                error = exc.errno
                break
            if pid == 0:
                time.sleep(1000)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return {"forked": len(children), "errno": error}

    @rpc
    def spin(self, seconds: float = 0.5) -> float:
        end = time.monotonic() + seconds
        spins = 0
        while time.monotonic() < end:
            spins += 1
        return time.process_time()

    @rpc
    def open_many(self, n: int = 100) -> dict[str, Any]:
        files, error = [], None
        try:
            for _ in range(n):
                files.append(open(os.devnull))  # noqa: SIM115, PTH123
        except OSError as exc:
            error = exc.errno
        finally:
            for f in files:
                f.close()
        return {"opened": len(files), "errno": error}

    @rpc
    def write(self, path: str, text: str = "x") -> str:
        with open(path, "w") as f:  # noqa: PTH123
            f.write(text)
        return path

    @rpc
    def whoami(self) -> dict[str, str]:
        wanted = ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")
        status = {}
        with open("/proc/self/status") as f:  # noqa: PTH123
            for line in f:
                key, _, value = line.partition(":")
                if key in wanted:
                    status[key] = value.strip()
        with open("/proc/self/uid_map") as f:  # noqa: PTH123
            status["uid_map"] = f.read().strip()
        status["cwd"] = os.getcwd()  # noqa: PTH109
        return status

    @rpc
    def connect(self, host: str = "127.0.0.1", port: int = 9) -> str:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect((host, port))
        return "connected"

    @rpc
    def ptrace(self) -> int:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(0, 0, None, None) != 0:  # PTRACE_TRACEME
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return 0


class Counter(Echo):
    """Keeps a count in memory: what a re-adopted process must not lose."""

    async def start(self) -> None:
        await super().start()
        self.count = 0

    @rpc
    def incr(self) -> int:
        self.count += 1
        return self.count

    @rpc
    def say_later(self, text: str, delay: float, marker: str) -> None:
        """Print ``text`` after ``delay`` seconds, then create the file ``marker``."""

        def later() -> None:
            print(text, flush=True)
            Path(marker).touch()

        asyncio.get_running_loop().call_later(delay, later)
