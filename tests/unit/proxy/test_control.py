"""The control channel between supervisor and workers: its frames (sizes, garbage, any split of the
stream), the checks of every message, the hand-off records, and the supervisor's side on real pipes and
processes: a request answered, one not answered in time, a worker sending garbage killed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from proxy import control
from proxy.control import (
    HANDOFF,
    MAX_REPORT,
    MAX_REQUEST,
    REPORTS,
    REQUESTS,
    ControlError,
    FrameDecoder,
    HandoffDecoder,
    encode,
)
from proxy.services import SessionState, WorkerTermination
from proxy.workers import Supervisor, WorkerChannel, WorkerLink, snapshot


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def reports(data: bytes, limit: int = MAX_REPORT) -> list[dict[str, Any]]:
    return FrameDecoder(limit, REPORTS).feed(data)


# -- frames --------------------------------------------------------------------------------------------
messages = st.one_of(
    st.just({"t": "ready"}),
    st.just({"t": "closed"}),
    st.builds(
        lambda i, level: {"t": "reply", "id": i, "level": level},
        st.integers(0, 2**40),
        st.sampled_from(["debug", "info"]),
    ),
    st.builds(
        lambda v: {"t": "metrics", "m": {"pgveil_x": {'pgveil_x_total|[["role", "app"]]': v}}},
        st.floats(allow_nan=False, allow_infinity=False),
    ),
)


@given(st.lists(messages, max_size=8), st.lists(st.integers(1, 64), max_size=20))
def test_messages_come_out_whole_however_the_stream_is_split(msgs: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(encode(m, MAX_REPORT) for m in msgs)
    decoder = FrameDecoder(MAX_REPORT, REPORTS)
    out: list[dict[str, Any]] = []
    pos = 0
    for n in cuts:
        out += decoder.feed(stream[pos : pos + n])
        pos += n
    out += decoder.feed(stream[pos:])
    assert out == msgs
    assert decoder.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_are_messages_or_a_control_error_and_nothing_else(data: bytes) -> None:
    decoder = FrameDecoder(1024, REPORTS | REQUESTS)
    try:
        out = decoder.feed(data)
    except ControlError:
        with pytest.raises(ControlError):  # and the stream stays refused
            decoder.feed(encode({"t": "ready"}, 1024))
        return
    for msg in out:
        assert msg["t"] in REPORTS | REQUESTS


def test_the_size_limit_is_checked_on_the_length_before_the_body_arrives() -> None:
    decoder = FrameDecoder(100, REPORTS)
    with pytest.raises(ControlError, match="101 bytes announced, over the limit of 100"):
        decoder.feed(struct.pack(">I", 101))  # no body sent at all: refused on the header alone
    assert decoder.pending == 0
    body = json.dumps({"t": "closed", "pad": "x" * (100 - 26)}).encode()
    assert len(body) == 100
    assert FrameDecoder(100, REPORTS).feed(frame(body)) == [json.loads(body)]  # exactly the limit is fine
    with pytest.raises(ControlError, match="over the limit"):
        FrameDecoder(100, REPORTS).feed(struct.pack(">I", 2**32 - 1))


def test_a_message_over_the_limit_is_not_encoded() -> None:
    with pytest.raises(ControlError, match=r"a metrics message of \d+ bytes is over the limit of 64"):
        encode({"t": "metrics", "m": {"x": {"x|[]": 1.0}}, "pad": "y" * 64}, 64)
    assert len(encode({"t": "ready"}, 64)) == 4 + len(b'{"t":"ready"}')


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b'{"t": "ready"', "not UTF-8 JSON"),
        (b"", "not UTF-8 JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),  # nesting deep enough to exhaust the parser
        (b'["ready"]', "not a JSON object"),
        (b'"ready"', "not a JSON object"),
        (b"{}", "no known type"),
        (b'{"t": "shell"}', "no known type"),
        (b'{"t": 1}', "no known type"),
        (b'{"t": "sessions", "id": 1, "until": 1}', "no known type"),  # a request is not a report
        (b'{"t": "reply"}', "without a request id"),
        (b'{"t": "reply", "id": -1}', "without a request id"),
        (b'{"t": "reply", "id": true}', "without a request id"),
        (b'{"t": "reply", "id": "1"}', "without a request id"),
        (b'{"t": "metrics", "m": []}', "metrics that are not an object"),
        (b'{"t": "metrics", "m": {"a": 1}}', "family is not an object"),
        (b'{"t": "metrics", "m": {"a": {"a_total": 1}}}', "not name|labels: number"),
        (b'{"t": "metrics", "m": {"a": {"b_total|[]": 1}}}', "not name|labels: number"),
        (b'{"t": "metrics", "m": {"a": {"a_total|[]": "1"}}}', "not name|labels: number"),
        (b'{"t": "metrics", "m": {"a": {"a_total|[]": true}}}', "not name|labels: number"),
        (b'{"t": "metrics", "m": {"a": {"a_total|[[": 1}}}', "labels are not JSON"),
        (b'{"t": "metrics", "m": {"a": {"a_total|{}": 1}}}', "not name/value pairs"),
        (b'{"t": "metrics", "m": {"a": {"a_total|[[\\"k\\", 1]]": 1}}}', "not name/value pairs"),
    ],
)
def test_garbage_from_a_worker_is_refused_with_what_it_is(body: bytes, why: str) -> None:
    with pytest.raises(ControlError, match=why) as exc:
        reports(frame(body))
    assert "shell" not in str(exc.value)  # the error names the fault, never the bytes


@pytest.mark.parametrize(
    "request_",
    [
        {"t": "sessions", "id": 1},  # no deadline
        {"t": "sessions", "id": 1, "until": "soon"},
        {"t": "terminate", "id": 1, "until": 5.0},  # no session
        {"t": "terminate", "id": 1, "until": 5.0, "session": -3},
        {"t": "log_level", "id": 1, "level": "trace", "source": "api"},
        {"t": "log_level", "id": 1, "level": "info", "source": "someone"},
        {"t": "ready"},  # a report is not a request
    ],
)
def test_requests_a_worker_refuses(request_: dict[str, Any]) -> None:
    with pytest.raises(ControlError):
        FrameDecoder(MAX_REQUEST, REQUESTS).feed(frame(json.dumps(request_).encode()))


def test_requests_a_worker_takes() -> None:
    ok = [
        {"t": "sessions", "id": 1, "until": 12.5},
        {"t": "terminate", "id": 2, "until": 12, "session": 7},
        {"t": "log_level", "id": 3, "level": None, "source": "api"},
        {"t": "log_level", "id": 4, "level": "debug", "source": "reload"},
    ]
    data = b"".join(encode(m, MAX_REQUEST) for m in ok)
    assert FrameDecoder(MAX_REQUEST, REQUESTS).feed(data) == ok


# -- replies -------------------------------------------------------------------------------------------
SESSION = {
    "id": 12,
    "role": "app",
    "database": "app",
    "client_address": "10.0.0.5",
    "client_port": 51234,
    "started_at": "2026-12-02T04:40:28+00:00",
    "state": "idle in transaction",
    "tls": True,
    "process": 0,
}


def test_a_session_list_is_taken_with_the_supervisor_s_process_number() -> None:
    (info,) = control.parse_sessions({"sessions": [SESSION]}, 3)
    assert (info.id, info.role, info.process, info.state) == (12, "app", 3, SessionState.IDLE_IN_TRANSACTION)
    nulls = {**SESSION, "role": None, "database": None, "client_address": None, "client_port": None}
    assert control.parse_sessions({"sessions": [nulls]}, 1)[0].role is None


@pytest.mark.parametrize(
    "change",
    [
        {"id": -1},
        {"id": 1.5},
        {"role": 5},
        {"role": "r" * 2000},
        {"client_port": 70000},
        {"state": "sleeping"},
        {"tls": "yes"},
        {"started_at": None},
    ],
)
def test_a_session_list_with_a_wrong_field_is_garbage(change: dict[str, Any]) -> None:
    with pytest.raises(ControlError, match="not those of a session"):
        control.parse_sessions({"sessions": [{**SESSION, **change}]}, 1)


def test_other_replies_are_checked_too() -> None:
    bad: dict[str, Any]
    for bad in ({"sessions": {}}, {"sessions": ["x"]}):
        with pytest.raises(ControlError):
            control.parse_sessions(bad, 1)
    assert control.parse_terminated({"terminated": False}) is False
    with pytest.raises(ControlError):
        control.parse_terminated({"terminated": 1})
    assert control.parse_level({"level": "warning"}) == "warning"
    with pytest.raises(ControlError):
        control.parse_level({"level": "loud"})
    assert control.reply_error({"error": "e" * 500}) == "e" * 200
    with pytest.raises(ControlError):
        control.reply_error({"error": 3})


# -- hand-off records ----------------------------------------------------------------------------------
def test_hand_off_records_pair_with_their_descriptors_however_they_arrive() -> None:
    decoder = HandoffDecoder()
    a, b = HANDOFF.pack(b"C", 7), HANDOFF.pack(b"C", 2**40)
    assert decoder.feed(a[:4], [100]) == []  # the descriptor comes with the record's first byte
    assert decoder.feed(a[4:] + b, [101]) == [(7, 100), (2**40, 101)]
    with pytest.raises(ControlError, match="without a descriptor"):
        HandoffDecoder().feed(a, [])
    with pytest.raises(ControlError, match="not C and a session id"):
        HandoffDecoder().feed(b"X" + a[1:], [5])


# -- the supervisor's side, on real pipes and processes ------------------------------------------------
async def sleeper() -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")


async def test_a_worker_sending_garbage_is_killed_and_not_believed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    proc = await sleeper()
    sup = Supervisor(Path("unused.yaml"), None, 2)
    ours, _theirs = socket.socketpair()
    link = sup.links[1] = WorkerLink(1, proc, ours)
    read_fd, write_fd = os.pipe()
    reader = asyncio.get_running_loop().create_task(sup._read_reports(link, read_fd))
    try:
        os.write(write_fd, encode({"t": "ready"}, MAX_REPORT) + encode({"t": "closed"}, MAX_REPORT))
        for _ in range(200):
            if link.ready:
                break
            await asyncio.sleep(0.01)
        assert link.ready
        os.write(write_fd, frame(b'{"t": "closed", "x": ') + b"\x00" * 16)
        assert await asyncio.wait_for(proc.wait(), 10) == -9  # killed; the restart loop starts another
        await asyncio.wait_for(reader, 5)
        assert link.distrusted
        assert not link.ready
        assert "worker 1 sent a message that is not UTF-8 JSON; it is not trusted any more" in caplog.text
        assert await sup._ask(link, {"t": "sessions"}) is None  # nothing more is asked of it
    finally:
        os.close(write_fd)
        ours.close()
        _theirs.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_worker_announcing_an_oversized_report_is_killed(caplog: pytest.LogCaptureFixture) -> None:
    proc = await sleeper()
    sup = Supervisor(Path("unused.yaml"), None, 2)
    ours, theirs = socket.socketpair()
    link = sup.links[1] = WorkerLink(1, proc, ours)
    read_fd, write_fd = os.pipe()
    reader = asyncio.get_running_loop().create_task(sup._read_reports(link, read_fd))
    try:
        os.write(write_fd, struct.pack(">I", MAX_REPORT + 1))
        assert await asyncio.wait_for(proc.wait(), 10) == -9
        await asyncio.wait_for(reader, 5)
        assert f"over the limit of {MAX_REPORT}" in caplog.text
    finally:
        os.close(write_fd)
        ours.close()
        theirs.close()


async def start_pair(
    on_request: Any, registry: CollectorRegistry | None = None
) -> tuple[Supervisor, WorkerLink, WorkerChannel, list[Any]]:
    """A supervisor's link and a worker's channel in this process, joined by real pipes and a socket."""
    loop = asyncio.get_running_loop()
    report_read, report_write = os.pipe()
    req_read, req_write = os.pipe()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    proc = await sleeper()
    sup = Supervisor(Path("unused.yaml"), None, 2)
    link = sup.links[1] = WorkerLink(1, proc, ours)
    link.requests, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(req_write, "wb"))
    reader = loop.create_task(sup._read_reports(link, report_read))
    channel = WorkerChannel(
        registry or CollectorRegistry(),
        report_write,
        theirs.detach(),
        lambda sock, sid: sock.close(),
        lambda: None,
        control_fd=req_read,
        on_request=on_request,
    )
    await channel.start()
    return sup, link, channel, [reader, proc, ours]


async def stop_pair(link: WorkerLink, channel: WorkerChannel, rest: list[Any]) -> None:
    reader, proc, ours = rest
    channel.close()
    assert link.requests is not None
    link.requests.close()
    await asyncio.wait_for(reader, 5)
    proc.kill()
    await proc.wait()
    ours.close()


async def test_a_request_is_answered_and_checked() -> None:
    asked: list[Any] = []

    def answer(request: Any) -> dict[str, Any]:
        asked.append(dict(request))
        if request["t"] == "sessions":
            return {"sessions": [SESSION]}
        if request["t"] == "terminate":
            return {"terminated": request["session"] == 12}
        return {"level": request["level"] or "info"}

    registry = CollectorRegistry()
    Counter("pgveil_things", "things", registry=registry).inc(5)
    sup, link, channel, rest = await start_pair(answer, registry)
    try:
        (listed,) = await sup.sessions()
        assert listed.process == 1
        assert listed.sessions is not None
        assert [(s.id, s.process) for s in listed.sessions] == [(12, 1)]
        assert (await sup.terminate(12)).process == 1
        assert (await sup.terminate(13)) == WorkerTermination(None, ())
        assert await sup.log_levels("debug", "api") == {1: "debug"}
        assert asked[-1] == {"t": "log_level", "id": asked[-1]["id"], "level": "debug", "source": "api"}
        assert "until" in asked[0]  # sessions and terminate expire; a level does not
        assert link.ready
        assert not link.pending
    finally:
        await stop_pair(link, channel, rest)


async def test_a_worker_that_does_not_read_is_reported_unanswered_in_time() -> None:
    loop = asyncio.get_running_loop()
    report_read, report_write = os.pipe()
    req_read, req_write = os.pipe()  # nobody reads req_read: a worker stuck in a long computation
    proc = await sleeper()
    sup = Supervisor(Path("unused.yaml"), None, 2)
    sup.request_timeout = 0.2
    ours, theirs = socket.socketpair()
    link = sup.links[1] = WorkerLink(1, proc, ours, sessions=4)
    link.requests, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(req_write, "wb"))
    reader = loop.create_task(sup._read_reports(link, report_read))
    try:
        (answer,) = await sup.sessions()
        assert (answer.sessions, answer.count) == (None, 4)
        assert (await sup.terminate(5)).unanswered == (1,)
        assert await sup.log_levels() == {1: None}
        assert not link.pending
        # What it finds when it reads at last: the requests, the first two past their deadline.
        pending = FrameDecoder(MAX_REQUEST, REQUESTS).feed(os.read(req_read, 65536))
        assert [r["t"] for r in pending] == ["sessions", "terminate", "log_level"]
        assert ["until" in r for r in pending] == [True, True, False]
    finally:
        link.requests.close()
        os.close(report_write)
        await asyncio.wait_for(reader, 5)
        os.close(req_read)
        proc.kill()
        await proc.wait()
        ours.close()
        theirs.close()


async def test_a_worker_answers_an_expired_request_with_an_error_and_does_nothing() -> None:
    terminated: list[int] = []

    def answer(request: Any) -> dict[str, Any]:
        terminated.append(request["session"])
        return {"terminated": True}

    _, link, channel, rest = await start_pair(answer)
    try:
        assert link.requests is not None
        answer_: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending[99] = ("terminate", answer_)
        link.requests.write(encode({"t": "terminate", "id": 99, "until": 0.0, "session": 3}, MAX_REQUEST))
        assert await asyncio.wait_for(answer_, 5) is None  # an error reply: no answer
        assert terminated == []
    finally:
        await stop_pair(link, channel, rest)


def test_a_snapshot_of_a_real_registry_passes_the_checks() -> None:
    registry = CollectorRegistry()
    Counter("pgveil_hits", "hits", ["role"], registry=registry).labels(role='we"ird|role').inc()
    snap = snapshot(registry)
    assert control.check_snapshot(json.loads(json.dumps(snap))) == snap
    assert reports(encode({"t": "metrics", "m": snap}, MAX_REPORT))[0]["m"] == snap


def test_the_log_level_changes_of_a_worker_are_not_added_to_the_supervisor_s() -> None:
    from proxy.admin.metrics import Metrics

    snap = snapshot(cast(Any, Metrics("t").registry))
    assert "pgveil_log_level_changes" not in snap  # the supervisor counts each change once, for all
    assert any(k.startswith("pgveil_") for k in snap)
