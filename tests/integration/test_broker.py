"""The broker with real ZeroMQ sockets: routing, deadlines, queueing, garbage."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from osk_daemon.errors import DeadlineExceeded, PluginError, Unavailable
from osk_daemon.ipc.broker import Broker, InstanceKey
from osk_daemon.ipc.codec import (
    Header,
    Kind,
    encode_header,
    encode_reply_header,
    pack,
    split_batch,
    split_dealer_frames,
    unpack,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30), pytest.mark.anyio]


class Harness:
    def __init__(self, broker: Broker, ctx: zmq.asyncio.Context, tmp: str) -> None:
        self.broker = broker
        self.ctx = ctx
        self.clients = f"ipc://{tmp}/c.sock"
        self.workers = f"ipc://{tmp}/w.sock"
        self.seen: list[tuple[InstanceKey, Kind]] = []
        self.sockets: list[zmq.asyncio.Socket] = []
        self.heard = asyncio.Event()  # set by the broker's listener (the fixture's)
        self._worker_side: set[zmq.asyncio.Socket] = set()
        self._tokens = itertools.count()

    def dealer(self, endpoint: str | None = None) -> zmq.asyncio.Socket:
        """A caller's socket (client endpoint) unless another endpoint is given."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint or self.clients)
        self.sockets.append(sock)
        if endpoint == self.workers:
            self._worker_side.add(sock)
        return sock

    async def worker(self, key: InstanceKey, token: str = "t") -> zmq.asyncio.Socket:
        sock = self.dealer(self.workers)
        await self.hello(sock, key, token)
        return sock

    async def hello(self, sock: zmq.asyncio.Socket, key: InstanceKey, token: str) -> None:
        """Bind ``sock`` to ``key``; returns once the broker has passed the HELLO on."""
        self.broker.declare(key[0])
        self.broker.expect(token, key)
        await sock.send_multipart([encode_header(Kind.HELLO), pack({"token": token})])
        async with asyncio.timeout(5):
            while (key, Kind.HELLO) not in self.seen:
                await self.heard.wait()
                self.heard.clear()

    async def barrier(self, sock: zmq.asyncio.Socket) -> None:
        """Return once the broker has handled everything ``sock`` sent before.

        ZeroMQ keeps one connection's messages in order, so the answer to a request for a
        plugin nobody declared (answered at once) comes after everything sent earlier. A
        worker socket that never said HELLO is bound first (its earlier frames stay
        unauthenticated: the broker has already dropped them by then).
        """
        if sock in self._worker_side:
            n = next(self._tokens)
            await self.hello(sock, (f"barrier{n}", 0), f"barrier-token-{n}")
        await request(sock, 999_999, "nobody-declared-this")
        header, body = await recv(sock)
        assert (header.id, unpack(body)["code"]) == (999_999, Unavailable.code)


async def recv(sock: zmq.asyncio.Socket, timeout: float = 5.0) -> tuple[Header, bytes]:
    assert await sock.poll(timeout * 1000), "no frame arrived"
    return split_dealer_frames(await sock.recv_multipart())


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    tmp = tempfile.mkdtemp(prefix="osk-broker-")
    ctx = zmq.asyncio.Context()
    seen: list[tuple[InstanceKey, Kind]] = []
    heard = asyncio.Event()

    def listener(key: InstanceKey, header: Header, body: bytes) -> None:
        seen.append((key, header.kind))
        heard.set()

    broker = Broker(
        f"ipc://{tmp}/c.sock",
        f"ipc://{tmp}/w.sock",
        listener,
        max_message_size=1 << 16,
        default_timeout=2.0,
        ctx=zmq.Context(),
    )
    broker.start()
    harness = Harness(broker, ctx, tmp)
    harness.seen = seen
    harness.heard = heard
    yield harness
    for sock in harness.sockets:
        sock.close(0)
    broker.close()
    ctx.term()
    broker._ctx.term()
    shutil.rmtree(tmp)


async def request(sock: zmq.asyncio.Socket, rid: int, target: str, deadline: float = 0.0) -> None:
    header = encode_header(Kind.REQUEST, rid, target, "m", deadline)
    await sock.send_multipart([header, pack({"x": 1})])


async def test_request_is_routed_and_the_reply_gets_the_callers_id(h: Harness) -> None:
    worker = await h.worker(("echo", 0))
    h.broker.set_ready(("echo", 0), True)
    client = h.dealer()
    await request(client, 41, "echo")
    header, body = await recv(worker)
    assert header.kind is Kind.REQUEST and header.method == "m"
    assert unpack(body) == {"x": 1}
    assert header.deadline > time.monotonic()  # the default deadline was filled in
    await worker.send_multipart([encode_header(Kind.REPLY, header.id), pack("ok")])
    reply, rbody = await recv(client)
    assert (reply.kind, reply.id, unpack(rbody)) == (Kind.REPLY, 41, "ok")


async def test_unknown_plugin_is_unavailable_at_once(h: Harness) -> None:
    client = h.dealer()
    await request(client, 1, "nope")
    header, body = await recv(client)
    assert header.kind is Kind.ERROR
    assert unpack(body)["code"] == Unavailable.code


async def test_requests_queue_while_starting_and_flow_when_ready(h: Harness) -> None:
    h.broker.declare("late")
    client = h.dealer()
    await request(client, 5, "late")
    worker = await h.worker(("late", 0))
    assert not await worker.poll(50)  # not ready yet: nothing delivered
    h.broker.set_ready(("late", 0), True)
    header, _ = await recv(worker)
    assert header.kind is Kind.REQUEST


async def test_stopped_plugin_refuses_and_queued_requests_fail(h: Harness) -> None:
    h.broker.declare("s")
    client = h.dealer()
    await request(client, 1, "s")
    await h.barrier(client)  # request 1 is queued now
    h.broker.set_accepting("s", False)
    header, body = await recv(client)
    assert unpack(body)["code"] == Unavailable.code
    await request(client, 2, "s")
    header, body = await recv(client)
    assert (header.id, unpack(body)["code"]) == (2, Unavailable.code)


async def test_deadline_is_answered_with_timeout(h: Harness) -> None:
    await h.worker(("slow", 0))
    h.broker.set_ready(("slow", 0), True)
    client = h.dealer()
    await request(client, 3, "slow", deadline=time.monotonic() + 0.05)
    header, body = await recv(client)
    assert (header.kind, header.id) == (Kind.ERROR, 3)
    assert unpack(body)["code"] == DeadlineExceeded.code
    assert h.broker.stats.timeouts == 1


async def test_lost_instance_fails_its_in_flight_requests(h: Harness) -> None:
    worker = await h.worker(("w", 0))
    h.broker.set_ready(("w", 0), True)
    client = h.dealer()
    await request(client, 9, "w")
    await recv(worker)
    h.broker.detach(("w", 0), "crashed")
    _header, body = await recv(client)
    assert unpack(body)["code"] == PluginError.code


async def test_least_loaded_instance_is_chosen(h: Harness) -> None:
    w0 = await h.worker(("p", 0), "a")
    w1 = await h.worker(("p", 1), "b")
    h.broker.set_ready(("p", 0), True)
    h.broker.set_ready(("p", 1), True)
    client = h.dealer()
    for i in range(4):
        await request(client, i, "p")
    got = {w0: 0, w1: 0}
    poller = zmq.asyncio.Poller()
    for sock in got:
        poller.register(sock, zmq.POLLIN)
    async with asyncio.timeout(5):
        while sum(got.values()) < 4:  # exactly 4 requests exist: no "no more frames" wait
            for sock, _ in await poller.poll():
                for header, _body in split_batch(await sock.recv_multipart()):
                    assert header.kind is Kind.REQUEST
                    got[sock] += 1
    assert list(got.values()) == [2, 2]


async def test_local_call(h: Harness) -> None:
    import anyio

    worker = await h.worker(("echo", 0))
    h.broker.set_ready(("echo", 0), True)

    async def answer() -> None:
        header, body = await recv(worker)
        await worker.send_multipart([encode_header(Kind.REPLY, header.id), body])

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer)
        assert unpack(await h.broker.call("echo", "m", pack([1, 2]), 2.0)) == [1, 2]
    with pytest.raises(Unavailable):
        await h.broker.call("missing", "m", b"")


async def test_garbage_is_dropped_and_counted_and_the_broker_lives_on(h: Harness) -> None:
    evils = [h.dealer(), h.dealer(h.workers)]
    for evil in evils:
        await evil.send_multipart([b"only one frame"])
        await evil.send_multipart([b"\xc1", b""])
        await evil.send_multipart([b"a", b"b", b"c", b"d"])
        await evil.send_multipart([encode_header(Kind.REPLY, 1), b""])  # never said HELLO
        await evil.send_multipart([encode_header(Kind.HELLO), pack({"token": "forged"})])
        await evil.send_multipart([encode_header(Kind.STOP), b""])  # a daemon-only kind
    stop, _ = await recv(evils[1])  # a worker that talks before HELLO is told to stop, once
    assert stop.kind is Kind.STOP
    for evil in evils:
        await h.barrier(evil)  # still answering, and everything above was handled
    # 3 unsplittable on each socket; on the client socket also REPLY, HELLO and STOP (not
    # REQUEST); on the worker socket REPLY, the forged HELLO and STOP are unauthenticated
    assert h.broker.stats.dropped_malformed == 9
    assert h.broker.stats.dropped_unauthenticated == 3


async def test_unauthenticated_workers_cannot_call_plugins(h: Harness) -> None:
    worker = await h.worker(("echo", 0))
    h.broker.set_ready(("echo", 0), True)
    stranger = h.dealer(h.workers)
    await request(stranger, 1, "echo")
    told, _ = await recv(stranger)
    assert told.kind is Kind.STOP  # a stray: e.g. a plugin of a previous daemon
    await h.barrier(stranger)
    assert h.broker.stats.dropped_unauthenticated == 1
    # an authenticated worker may call (itself, here); had the stranger's request been
    # routed, it would have reached the worker first
    header = encode_header(Kind.REQUEST, 2, "echo", "from-worker", 0.0)
    await worker.send_multipart([header, pack(None)])
    got, _ = await recv(worker)
    assert (got.kind, got.method) == (Kind.REQUEST, "from-worker")


async def test_reply_from_another_peer_is_ignored(h: Harness) -> None:
    worker = await h.worker(("a", 0), "t1")
    other = await h.worker(("b", 0), "t2")
    h.broker.set_ready(("a", 0), True)
    client = h.dealer()
    await request(client, 1, "a", deadline=time.monotonic() + 0.3)
    header, _ = await recv(worker)
    await other.send_multipart([encode_header(Kind.REPLY, header.id), pack("forged")])
    reply, _body = await recv(client)
    assert reply.kind is Kind.ERROR  # the forged reply was dropped; the deadline answered
    assert h.broker.stats.late_replies == 1


async def test_batches_are_routed_and_answered_in_batches(h: Harness) -> None:
    worker = await h.worker(("echo", 0))
    h.broker.set_ready(("echo", 0), True)
    client = h.dealer()
    deadline = time.monotonic() + 5
    frames: list[bytes] = []
    for i in range(20):
        frames += [encode_header(Kind.REQUEST, 100 + i, "echo", "m", deadline), pack(i)]
    await client.send_multipart(frames)  # one message, 20 requests
    requests: list[tuple[Header, bytes]] = []
    messages = 0
    while len(requests) < 20:
        assert await worker.poll(5000)
        requests += split_batch(await worker.recv_multipart())
        messages += 1
    assert messages < 20  # what one pass routed left together
    answer: list[bytes] = []
    for header, body in requests:  # answered in the reply form, in one message
        answer += [encode_reply_header(Kind.REPLY, header.id), body]
    await worker.send_multipart(answer)
    replies: dict[int, object] = {}
    while len(replies) < 20:
        assert await client.poll(5000)
        for header, body in split_batch(await client.recv_multipart()):
            assert header.kind is Kind.REPLY
            replies[header.id] = unpack(body)
    assert replies == {100 + i: i for i in range(20)}
    assert h.broker.stats.replies == 20


async def test_a_malformed_pair_drops_the_rest_of_its_batch(h: Harness) -> None:
    client = h.dealer()
    good = encode_header(Kind.REQUEST, 1, "nobody", "m")
    await client.send_multipart([good, b"", b"\xc1", b"", encode_header(Kind.REQUEST, 2), b""])
    header, body = await recv(client)
    assert (header.id, unpack(body)["code"]) == (1, Unavailable.code)  # the one before
    await h.barrier(client)  # request 2 never got an answer
    assert h.broker.stats.dropped_malformed == 1


async def test_requests_for_a_worker_that_vanished_wait_for_its_replacement(h: Harness) -> None:
    monitor = h.broker._workers.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        worker = await h.worker(("gone", 0), "old")
        h.broker.set_ready(("gone", 0), True)
        worker.close(0)  # the instance is still "ready": nobody told the broker yet
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: monitor.poll(5000) and monitor.recv_multipart())
        client = h.dealer()
        await request(client, 5, "gone", deadline=time.monotonic() + 5)
        await h.barrier(client)  # request 5 was routed, could not be sent, and waits
        assert not await client.poll(50)
        h.seen.clear()  # so that the harness waits for the replacement's own HELLO
        replacement = await h.worker(("gone", 0), "new")
        h.broker.set_ready(("gone", 0), True)
        header, body = await recv(replacement)
        assert (header.kind, unpack(body)) == (Kind.REQUEST, {"x": 1})
        await replacement.send_multipart([encode_reply_header(Kind.REPLY, header.id), b""])
        reply, _ = await recv(client)
        assert (reply.kind, reply.id) == (Kind.REPLY, 5)
    finally:
        h.broker._workers.sock.disable_monitor()
        monitor.close(0)
