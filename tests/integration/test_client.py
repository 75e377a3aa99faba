"""``Client`` against a ROUTER played by the test: batches, answers in any order, garbage,
and the deadline when nobody answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from osk_daemon.errors import DeadlineExceeded, FrameError, Unavailable
from osk_daemon.ipc.client import Client
from osk_daemon.ipc.codec import (
    SEND_BATCH,
    Header,
    Kind,
    encode_reply_header,
    pack,
    split_batch,
    unpack,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.integration]


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/r.sock"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(0)
    ctx.term()


Answer = Callable[[bytes, list[tuple[Header, bytes]]], None]


def serve(sock: zmq.Socket[bytes], calls: int, answer: Answer) -> threading.Thread:
    """Collect ``calls`` requests, then ``answer(peer, pairs)`` them (in a thread)."""

    def run() -> None:
        pairs: list[tuple[Header, bytes]] = []
        peer = b""
        while len(pairs) < calls:
            assert sock.poll(10_000)
            frames = sock.recv_multipart()
            peer = frames[0]
            batch = split_batch(frames, 1)
            assert len(batch) <= SEND_BATCH
            pairs += batch
        answer(peer, pairs)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_call_many_sends_batches_and_takes_answers_in_any_order(
    router: tuple[zmq.Socket[bytes], str],
) -> None:
    sock, endpoint = router
    n = 3 * SEND_BATCH + 5

    def answer(peer: bytes, pairs: list[tuple[Header, bytes]]) -> None:
        frames = [peer]
        for header, body in reversed(pairs):
            args = unpack(body)
            if args["i"] % 10 == 0:
                error = pack(Unavailable("no").to_wire())
                frames += [encode_reply_header(Kind.ERROR, header.id), error]
            else:
                frames += [encode_reply_header(Kind.REPLY, header.id), pack(args["i"])]
        frames += [b"\xc1", b""]  # a broken header at the end is dropped, nothing else
        sock.send_multipart(frames)

    thread = serve(sock, n, answer)
    with Client(endpoint, timeout=10) as client:
        results = client.call_many([("p", "m", {"i": i}) for i in range(n)])
    thread.join()
    for i, result in enumerate(results):
        if i % 10 == 0:
            assert isinstance(result, Unavailable)
        else:
            assert result == i


def test_a_call_nobody_answers_ends_at_its_deadline(
    router: tuple[zmq.Socket[bytes], str],
) -> None:
    _sock, endpoint = router
    with Client(endpoint) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.call("p", "m", timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 2.0


def test_an_unreadable_body_is_that_calls_error(router: tuple[zmq.Socket[bytes], str]) -> None:
    sock, endpoint = router

    def answer(peer: bytes, pairs: list[tuple[Header, bytes]]) -> None:
        (header, _body), *_ = pairs
        sock.send_multipart([peer, encode_reply_header(Kind.REPLY, header.id), b"\xc1"])

    thread = serve(sock, 1, answer)
    with Client(endpoint, timeout=5) as client, pytest.raises(FrameError):
        client.call("p", "m")
    thread.join()


def test_a_short_call_after_a_long_one_still_ends_at_its_own_deadline(
    router: tuple[zmq.Socket[bytes], str],
) -> None:
    sock, endpoint = router

    def answer(peer: bytes, pairs: list[tuple[Header, bytes]]) -> None:
        (header, _body), *_ = pairs
        sock.send_multipart([peer, encode_reply_header(Kind.REPLY, header.id), pack("long")])

    thread = serve(sock, 1, answer)
    with Client(endpoint) as client:
        assert client.call("p", "m", timeout=30) == "long"  # the receive timeout is ~30 s now
        thread.join()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.call("p", "m", timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 2.0


def test_a_late_answer_to_a_call_that_timed_out_is_not_the_next_calls(
    router: tuple[zmq.Socket[bytes], str],
) -> None:
    sock, endpoint = router

    def answer(peer: bytes, pairs: list[tuple[Header, bytes]]) -> None:
        (late, _), (now, _) = pairs
        sock.send_multipart([peer, encode_reply_header(Kind.REPLY, late.id), pack("late")])
        sock.send_multipart([peer, encode_reply_header(Kind.REPLY, now.id), pack("now")])

    thread = serve(sock, 2, answer)
    with Client(endpoint) as client:
        with pytest.raises(DeadlineExceeded):
            client.call("p", "m", timeout=0.05)
        assert client.call("p", "m", timeout=5) == "now"
    thread.join()
