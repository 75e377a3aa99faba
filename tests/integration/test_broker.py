"""The broker with real ZeroMQ sockets: routing, deadlines, queueing, garbage."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from osk_daemon.errors import DeadlineExceeded, PluginError, Unavailable
from osk_daemon.ipc.broker import Broker, InstanceKey
from osk_daemon.ipc.codec import Header, Kind, encode_header, pack, split_dealer_frames, unpack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30), pytest.mark.anyio]


class Harness:
    def __init__(self, broker: Broker, ctx: zmq.asyncio.Context, tmp: str) -> None:
        self.broker = broker
        self.ctx = ctx
        self.clients = f"ipc://{tmp}/c.sock"
        self.workers = f"ipc://{tmp}/w.sock"
        self.seen: list[tuple[InstanceKey, Kind]] = []
        self.sockets: list[zmq.asyncio.Socket] = []

    def dealer(self, endpoint: str | None = None) -> zmq.asyncio.Socket:
        """A caller's socket (client endpoint) unless another endpoint is given."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint or self.clients)
        self.sockets.append(sock)
        return sock

    async def worker(self, key: InstanceKey, token: str = "t") -> zmq.asyncio.Socket:
        self.broker.declare(key[0])
        self.broker.expect(token, key)
        sock = self.dealer(self.workers)
        await sock.send_multipart([encode_header(Kind.HELLO), pack({"token": token})])
        await wait_for(lambda: (key, Kind.HELLO) in self.seen)
        return sock


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    import anyio

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.001)  # yield to the loop; the deadline bounds it


async def recv(sock: zmq.asyncio.Socket, timeout: float = 5.0) -> tuple[Header, bytes]:
    assert await sock.poll(timeout * 1000), "no frame arrived"
    return split_dealer_frames(await sock.recv_multipart())


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    tmp = tempfile.mkdtemp(prefix="osk-broker-")
    ctx = zmq.asyncio.Context()
    seen: list[tuple[InstanceKey, Kind]] = []
    broker = Broker(
        f"ipc://{tmp}/c.sock",
        f"ipc://{tmp}/w.sock",
        lambda key, header, body: seen.append((key, header.kind)),
        max_message_size=1 << 16,
        default_timeout=2.0,
        ctx=zmq.Context(),
    )
    broker.start()
    harness = Harness(broker, ctx, tmp)
    harness.seen = seen
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
    await wait_for(lambda: h.broker.stats.requests == 1)
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
    got = [0, 0]
    for idx, sock in enumerate((w0, w1)):
        while await sock.poll(200):
            await sock.recv_multipart()
            got[idx] += 1
    assert got == [2, 2]


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
    for evil in (h.dealer(), h.dealer(h.workers)):
        await evil.send_multipart([b"only one frame"])
        await evil.send_multipart([b"\xc1", b""])
        await evil.send_multipart([b"a", b"b", b"c", b"d"])
        await evil.send_multipart([encode_header(Kind.REPLY, 1), b""])  # never said HELLO
        await evil.send_multipart([encode_header(Kind.HELLO), pack({"token": "forged"})])
        await evil.send_multipart([encode_header(Kind.STOP), b""])  # a daemon-only kind
    await wait_for(lambda: h.broker.stats.dropped_malformed >= 9)
    await wait_for(lambda: h.broker.stats.dropped_unauthenticated >= 3)
    client = h.dealer()
    await request(client, 1, "none")
    header, _ = await recv(client)
    assert header.id == 1  # still answering


async def test_unauthenticated_workers_cannot_call_plugins(h: Harness) -> None:
    worker = await h.worker(("echo", 0))
    h.broker.set_ready(("echo", 0), True)
    stranger = h.dealer(h.workers)
    await request(stranger, 1, "echo")
    await wait_for(lambda: h.broker.stats.dropped_unauthenticated >= 1)
    assert not await worker.poll(50)  # nothing was routed
    await request(worker, 2, "echo")  # an authenticated worker may call (itself, here)
    header, _ = await recv(worker)
    assert header.kind is Kind.REQUEST


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
