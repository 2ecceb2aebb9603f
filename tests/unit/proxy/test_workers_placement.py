"""The supervisor's placement of clients and the worker's side of the hand-off, on real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter

from proxy.control import MAX_REPORT, REPORTS, FrameDecoder
from proxy.workers import MergedRegistry, Supervisor, WorkerChannel, WorkerLink


def supervisor_with(*loads: tuple[int, bool]) -> Supervisor:
    sup = Supervisor(Path("unused.yaml"), None, len(loads) + 1)
    for slot, (sessions, ready) in enumerate(loads, start=1):
        a, _ = socket.socketpair()
        sup.links[slot] = WorkerLink(slot, cast(Any, None), a, sessions=sessions, ready=ready)
    return sup


def test_the_least_loaded_process_gets_the_client() -> None:
    sup = supervisor_with((3, True), (1, True))
    assert sup.pick(local_sessions=2) is sup.links[2]
    assert sup.pick(local_sessions=0) is None  # the supervisor itself


def test_workers_not_ready_get_no_clients() -> None:
    sup = supervisor_with((0, False), (5, True))
    assert sup.pick(local_sessions=6) is sup.links[2]  # not the idle worker that is not ready
    assert sup.pick(local_sessions=4) is None
    assert sup.pick(local_sessions=5) in (None, sup.links[2])
    assert all(sup.pick(local_sessions=9) is sup.links[2] for _ in range(5))


def test_ties_take_turns() -> None:
    sup = supervisor_with((0, True), (0, True))
    picked = [sup.pick(local_sessions=0) for _ in range(6)]
    slots = [0 if link is None else link.slot for link in picked]
    assert sorted(slots) == [0, 0, 1, 1, 2, 2]


def test_placing_a_burst_evenly() -> None:
    sup = supervisor_with((0, True), (0, True))
    local = 0
    for _ in range(30):
        link = sup.pick(local)
        if link is None:
            local += 1
        else:
            link.sessions += 1
    assert (local, sup.links[1].sessions, sup.links[2].sessions) == (10, 10, 10)


async def test_a_handed_off_connection_reaches_the_worker_and_closing_is_reported() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    read_fd, write_fd = os.pipe()
    received: list[socket.socket] = []
    ids: list[int] = []

    def on_client(sock: socket.socket, sid: int) -> None:
        received.append(sock)
        ids.append(sid)

    orphaned = asyncio.Event()
    channel = WorkerChannel(CollectorRegistry(), write_fd, theirs.detach(), on_client, orphaned.set)
    await channel.start()
    sup = Supervisor(Path("unused.yaml"), None, 2)
    link = sup.links[1] = WorkerLink(1, cast(Any, None), ours, ready=True)
    client, accepted = socket.socketpair()  # stands for a TCP connection the supervisor accepted
    try:
        assert sup.hand_off(link, accepted, 4711)
        accepted.close()  # the supervisor's copy; the worker's stays open
        assert link.sessions == 1
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.01)
        assert len(received) == 1
        assert ids == [4711]  # the supervisor's number for the session travels with it
        client.sendall(b"hello")
        assert received[0].recv(5) == b"hello"
        received[0].sendall(b"back")
        assert client.recv(4) == b"back"
        channel.session_closed()
        await asyncio.sleep(0.05)
        reports = FrameDecoder(MAX_REPORT, REPORTS).feed(os.read(read_fd, 65536))
        assert reports[:2] == [{"t": "ready"}, {"t": "closed"}]
        assert not orphaned.is_set()
        ours.close()  # the supervisor is gone
        await asyncio.wait_for(orphaned.wait(), 5)
    finally:
        client.close()
        for s in received:
            s.close()
        channel.close()
        os.close(read_fd)


def test_a_worker_that_cannot_take_a_client_leaves_it_to_the_supervisor() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()  # the worker is gone
    sup = Supervisor(Path("unused.yaml"), None, 2)
    link = sup.links[1] = WorkerLink(1, cast(Any, None), ours, ready=True)
    client, accepted = socket.socketpair()
    try:
        assert not sup.hand_off(link, accepted, 1)
        assert link.sessions == 0
    finally:
        for s in (ours, client, accepted):
            s.close()


def test_worker_snapshots_add_to_the_supervisors_samples() -> None:
    registry = CollectorRegistry()
    c = Counter("pgveil_things_total", "things", registry=registry)
    c.inc(2)
    merged = MergedRegistry(registry)
    merged.workers[1] = {"pgveil_things": {"pgveil_things_total|[]": 3.0}}
    merged.workers[2] = {"pgveil_things": {"pgveil_things_total|[]": 4.0}}
    values = {s.name: s.value for f in merged.collect() for s in f.samples if s.name == "pgveil_things_total"}
    assert values == {"pgveil_things_total": 9.0}
