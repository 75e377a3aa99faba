"""Which work next to the daemon raises its calls' tail latency: one neighbour at a time.

Why: ``swap.py``'s p99 during swaps stays at 4-7 ms whatever priority the swap's own
work runs at (SCHED_IDLE, ``cpu.idle``, nice, EEVDF slices: bench/README.md). This
script isolates the kinds of work a swap does (a process forked, a fresh one started,
one exiting, memory copied on write) and measures each one's effect on calls that do
not take part in it, so that the cause can be read off a table instead of guessed.

How: one real daemon runs ``counter`` (2 instances, ``bench/plugins/installed``). A load
process (``swap.Load``) calls it back to back for the whole run. For each neighbour in
turn, a separate Python process (nice 19 unless the row says nice 0) loops over one kind
of work while ``--calls`` calls go through; then it is killed and the next one starts.
Reported per neighbour: p50, p99 and max of those calls, and p99 against the no-neighbour
row of the same run.

Usage: ``python bench/neighbours.py [--calls N] [--json]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

from _common import (
    PERCENTILE_METHOD,
    daemon_config,
    emit,
    machine,
    ms,
    open_daemon,
    percentile,
    run_main,
    table,
)
from swap import INSTALLED, Load, wait_calls

_FORK_LOOP = """
b = bytearray(30 << 20)
b[0 : len(b) : 4096] = b"x" * (len(b) // 4096)
while True:
    pid = os.fork()
    if pid == 0:
        {child}
        os._exit(0)
    os.waitpid(pid, 0)
"""

# name -> the neighbour's code (after "import os; os.nice(19)" unless the name says nice 0)
NEIGHBOURS: dict[str, str | None] = {
    "none": None,
    "busy loop in user space": "while True: pass",
    "busy loop in user space, nice 0": "while True: pass",
    "mmap, touch, munmap 30 MiB": (
        "import mmap\nwhile True:\n    m = mmap.mmap(-1, 30 << 20)\n"
        "    m[0 : len(m) : 4096] = b'x' * ((30 << 20) // 4096)\n    m.close()"
    ),
    "thread start and exit": (
        "import threading\nwhile True:\n"
        "    t = threading.Thread(target=lambda: None); t.start(); t.join()"
    ),
    "fork + exit of 30 MiB, child touches nothing": _FORK_LOOP.format(child="pass"),
    "fork + exit of 30 MiB, child writes every page": _FORK_LOOP.format(
        child='b[0 : len(b) : 4096] = b"y" * (len(b) // 4096)'
    ),
    "Python start (import asyncio, zmq)": (
        "import subprocess, sys\nwhile True:\n"
        "    subprocess.run([sys.executable, '-c', 'import asyncio, zmq'])"
    ),
}


def neighbour(name: str, code: str) -> subprocess.Popen[bytes]:
    prelude = "import os\n" if name.endswith("nice 0") else "import os\nos.nice(19)\n"
    return subprocess.Popen([sys.executable, "-c", prelude + code])


def measure(calls: int) -> dict[str, Any]:
    config = daemon_config(
        {"counter": {"version": "1.0.0", "instances": 2}}, plugins_dir=str(INSTALLED)
    )
    windows: list[tuple[str, float, float]] = []
    with open_daemon(config) as d:
        load = Load(d.broker)
        load.start()
        try:
            wait_calls(d, load, 500)  # warm-up
            for name, code in NEIGHBOURS.items():
                proc = neighbour(name, code) if code is not None else None
                try:
                    wait_calls(d, load, 200)  # the neighbour gets going
                    start = time.monotonic()
                    wait_calls(d, load, calls)
                    windows.append((name, start, time.monotonic()))
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait(10)
        finally:
            load.stop()
    rows: dict[str, Any] = {}
    for name, start, end in windows:
        lat = [lat for s, lat, _, err in load.calls if start <= s <= end and not err]
        failed = sum(1 for s, _, _, err in load.calls if start <= s <= end and err)
        rows[name] = {
            "n": len(lat),
            "failed": failed,
            "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99),
            "max": max(lat),
        }
    return {"calls_per_neighbour": calls, "neighbours": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print exact JSON on stdout")
    parser.add_argument("--calls", type=int, default=3000, help="calls per neighbour")
    args = parser.parse_args()
    r = measure(args.calls)
    base = r["neighbours"]["none"]["p99"]
    rows = [
        [
            name,
            v["n"],
            ms(v["p50"]),
            ms(v["p99"]),
            ms(v["max"]),
            f"{v['p99'] / base:.1f}x" if base else "-",
        ]
        for name, v in r["neighbours"].items()
    ]
    text = (
        "neighbours: one sequential caller through the daemon while another process "
        "loops over one kind of work (nice 19 unless said)\n"
        f"percentiles: {PERCENTILE_METHOD}\n\n"
        + table(["neighbour", "calls", "p50", "p99", "max", "p99 vs none"], rows)
    )
    emit(text, {"machine": machine(), **r}, args.json)


if __name__ == "__main__":
    run_main(main)
