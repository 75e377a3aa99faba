"""RPC cost of the daemon's broker against raw pyzmq, same run, same machine.

Raw baseline: an echo server in its own process (multiprocessing, spawn) on an ``ipc://``
endpoint; it unpacks the msgpack body and packs the answer, as a plugin does. Sequential
latency uses REQ/REP; pipelined throughput uses DEALER/ROUTER, sending a window of messages
and then collecting that window's answers (what ``Client.call_many`` does).

Through the daemon: a real daemon with one ``benchplugins:Stamp`` instance; ``Client.call``
for latency, ``Client.call_many`` in the same windows for throughput. Each hop there is
client -> broker -> plugin -> broker -> client, with Python on both ends of every hop.

    python bench/rpc.py [--json] [--rounds N]   # N sequential calls (default 5000)
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import msgpack
import zmq
from _common import (
    PERCENTILE_METHOD,
    bench_plugin,
    daemon_config,
    emit,
    machine,
    open_daemon,
    parse_args,
    run_main,
    summarize,
    table,
    temp_dir,
    us,
    verdict,
)

from osk_daemon.ipc.client import Client

WARMUP = 500
WINDOWS = (100, 1000)
ARGS = {"text": "hello, plugin"}
GOAL_LATENCY_RATIO = 2.5
GOAL_THROUGHPUT_SHARE = 0.5


def _serve(kind: int, endpoint: str) -> None:
    """The raw echo server (runs in a child process until terminated)."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    # no high-water mark, like the client: a ROUTER drops what exceeds it, and a window
    # of 1000 answers could then hang the measurement waiting for a dropped one
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart()
        args = msgpack.unpackb(frames[-1], raw=False)
        frames[-1] = msgpack.packb({"text": args["text"]}, use_bin_type=True)
        sock.send_multipart(frames)


class _RawServer:
    """One ``_serve`` process, terminated and joined on exit."""

    def __init__(self, kind: int, endpoint: str) -> None:
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(kind, endpoint), daemon=True
        )

    def __enter__(self) -> _RawServer:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def raw_latency(endpoint: str, n: int) -> list[float]:
    body = msgpack.packb(ARGS, use_bin_type=True)
    samples: list[float] = []
    with _RawServer(zmq.REP, endpoint), zmq.Context() as ctx, ctx.socket(zmq.REQ) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for i in range(WARMUP + n):
            t = time.perf_counter()
            sock.send(body)
            msgpack.unpackb(sock.recv(), raw=False)
            if i >= WARMUP:
                samples.append(time.perf_counter() - t)
    return samples


def raw_throughput(endpoint: str, total: int) -> dict[int, float]:
    rates: dict[int, float] = {}
    with _RawServer(zmq.ROUTER, endpoint), zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint)

        def window(size: int) -> None:
            for _ in range(size):
                sock.send(msgpack.packb(ARGS, use_bin_type=True))
            for _ in range(size):
                msgpack.unpackb(sock.recv(), raw=False)

        for size in WINDOWS:
            window(size)  # warm-up
            t = time.perf_counter()
            for _ in range(total // size):
                window(size)
            rates[size] = (total // size) * size / (time.perf_counter() - t)
    return rates


def daemon_run(n: int, total: int) -> tuple[list[float], dict[int, float], str]:
    config = daemon_config({"bench": bench_plugin(instances=1)})
    samples: list[float] = []
    rates: dict[int, float] = {}
    with open_daemon(config) as daemon, Client(daemon.broker, timeout=30.0) as client:
        for i in range(WARMUP + n):
            t = time.perf_counter()
            client.call("bench", "echo", ARGS)
            if i >= WARMUP:
                samples.append(time.perf_counter() - t)
        for size in WINDOWS:
            batch = [("bench", "echo", ARGS)] * size
            client.call_many(batch)  # warm-up
            t = time.perf_counter()
            for _ in range(total // size):
                results = client.call_many(batch)
                if not isinstance(results[-1], dict):
                    raise RuntimeError(f"call_many failed: {results[-1]!r}")
            rates[size] = (total // size) * size / (time.perf_counter() - t)
    return samples, rates, config


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], 5000)
    n, total = args.rounds, 4 * args.rounds
    with temp_dir() as tmp:
        raw_lat = summarize(raw_latency(f"ipc://{tmp}/rep.sock", n))
        raw_rates = raw_throughput(f"ipc://{tmp}/router.sock", total)
    osk_samples, osk_rates, config = daemon_run(n, total)
    osk_lat = summarize(osk_samples)

    rows: list[list[Any]] = []
    for key in ("p50", "p99", "mean"):
        ratio = osk_lat[key] / raw_lat[key]
        rows.append([f"sequential call {key}", us(raw_lat[key]), us(osk_lat[key]), f"{ratio:.2f}x"])
    for size in WINDOWS:
        share = osk_rates[size] / raw_rates[size]
        rows.append(
            [
                f"pipelined calls/s, window {size}",
                f"{raw_rates[size]:,.0f}",
                f"{osk_rates[size]:,.0f}",
                f"{share:.0%} of raw",
            ]
        )
    latency_ratio = osk_lat["p50"] / raw_lat["p50"]
    shares = {size: osk_rates[size] / raw_rates[size] for size in WINDOWS}
    goals = {
        f"RPC p50 <= {GOAL_LATENCY_RATIO}x raw": latency_ratio <= GOAL_LATENCY_RATIO,
        f"pipelined >= {GOAL_THROUGHPUT_SHARE:.0%} of raw (every window)": all(
            s >= GOAL_THROUGHPUT_SHARE for s in shares.values()
        ),
    }
    text = "\n".join(
        [
            f"rpc: {n} sequential calls after {WARMUP} warm-up; {total} pipelined per window",
            f"percentiles: {PERCENTILE_METHOD}",
            "",
            table(["metric", "raw pyzmq", "osk-daemon", "ratio"], rows),
            "",
            f"goal RPC p50 <= {GOAL_LATENCY_RATIO}x raw: {latency_ratio:.2f}x "
            f"-> {verdict(latency_ratio <= GOAL_LATENCY_RATIO)}",
            *(
                f"goal pipelined >= {GOAL_THROUGHPUT_SHARE:.0%} of raw, window {size}: "
                f"{share:.0%} -> {verdict(share >= GOAL_THROUGHPUT_SHARE)}"
                for size, share in shares.items()
            ),
        ]
    )
    data = {
        "machine": machine(),
        "percentiles": PERCENTILE_METHOD,
        "unit": "seconds (latency), calls per second (throughput)",
        "sequential_calls": n,
        "warmup": WARMUP,
        "pipelined_calls_per_window": total,
        "raw": {"latency": raw_lat, "throughput": {str(k): v for k, v in raw_rates.items()}},
        "osk": {"latency": osk_lat, "throughput": {str(k): v for k, v in osk_rates.items()}},
        "latency_p50_ratio": latency_ratio,
        "throughput_share": {str(k): v for k, v in shares.items()},
        "goals": goals,
        "daemon_config": config,
    }
    emit(text, data, args.json)


if __name__ == "__main__":
    run_main(main)
