"""Several processes serving sessions (``sessions.workers``), for machines where one Python process is
the bottleneck (the per-value decryption of wide results, for instance).

The first process (the supervisor) binds the listen addresses, accepts every client and serves sessions
itself; it starts ``workers - 1`` worker processes (``pgveil serve --worker``). Each accepted connection
goes to the process with the fewest open sessions (the supervisor counts what it handed out and each
worker reports what it closed), passed as a file descriptor over a Unix socket (``SCM_RIGHTS``) before
a byte of it is read. Letting every process accept on shared sockets instead lets one process take a
whole burst of connections (an event loop accepts all it can at once), which leaves a few busy clients
on one core. Sessions are 1:1 with server connections and keep no shared state, so any process can
serve any client (and forward any CancelRequest). The supervisor also enforces
``sessions.max_client_connections`` over all processes.

The supervisor numbers every session (it passes the id with the connection), so a session id is unique
over all processes: ``[s12]`` in the log and ``12`` in ``GET /v1/sessions`` name one session.

Only the supervisor runs the admin server. It talks to each worker over a control channel of two pipes
carrying the frames of :mod:`proxy.control` (a size limit per message, every field checked). The worker
reports ``ready`` once it can serve, ``closed`` for every session it ended, and a snapshot of its metrics
about once a second; the supervisor's ``/metrics`` adds the snapshots to its own (counters, gauges and
histogram buckets are sums; ``process_*``/``python_*`` series, ``_created`` timestamps and the log level
changes, which the supervisor counts once for all, stay per supervisor). The supervisor asks (a request
with an id, its reply awaited for :attr:`Supervisor.request_timeout` at most): the worker's sessions,
terminate one, set or tell the log level. A worker starts at the supervisor's level of the moment. A
worker that sends anything but well-formed messages is logged, killed and started again, never believed.
SIGHUP and SIGTERM are passed on to the workers; a worker that dies is started again (the clients it served
lose their connections, as with any crashed server process); a worker whose supervisor is gone (a pipe or
its socket breaks) shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from proxy import control, logsetup
from proxy.control import ControlError
from proxy.services import SessionInfo, WorkerSessions, WorkerTermination

log = logging.getLogger(__name__)

# Not added up: per process by nature, or (log level changes) counted by the supervisor once for all.
_PER_PROCESS = ("process_", "python_", "pgveil_build_info", "pgveil_log_level_changes")
REQUEST_TIMEOUT = 1.0  # seconds a worker has to answer the supervisor's request
_PIPE_BACKLOG = 1 << 20  # requests a worker has not read yet: beyond this it is not asked more
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def snapshot(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """The additive samples of a registry: family name -> "sample name|labels json" -> value."""
    out: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        if family.name.startswith(_PER_PROCESS):
            continue
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            samples[s.name + "|" + json.dumps(sorted(s.labels.items()))] = float(s.value)
    return out


class MergedRegistry:
    """What the supervisor exposes: its own registry plus the workers' latest snapshots."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.workers: dict[int, dict[str, dict[str, float]]] = {}

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, dict[str, float]] = {}
        for snap in self.workers.values():
            for name, samples in snap.items():
                acc = extra.setdefault(name, {})
                for key, value in samples.items():
                    acc[key] = acc.get(key, 0.0) + value
        for family in self.registry.collect():
            add = extra.get(family.name)
            if not add:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen: set[str] = set()
            for s in family.samples:
                key = s.name + "|" + json.dumps(sorted(s.labels.items()))
                seen.add(key)
                merged.add_sample(s.name, s.labels, s.value + add.get(key, 0.0), s.timestamp, s.exemplar)
            for key, value in add.items():
                if key not in seen:
                    name, _, labels = key.partition("|")
                    merged.add_sample(name, dict(json.loads(labels)), value)
            yield merged


@dataclass(slots=True)
class WorkerLink:
    """The supervisor's side of one worker: its process, the socket its clients are passed over, and
    how many sessions it serves (handed out minus reported closed)."""

    slot: int
    proc: asyncio.subprocess.Process
    handoff: socket.socket
    sessions: int = 0
    ready: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    requests: asyncio.WriteTransport | None = None  # the pipe the worker reads requests from
    pending: dict[int, tuple[str, asyncio.Future[Any]]] = field(default_factory=dict)  # request id -> kind, answer
    distrusted: bool = False


class Supervisor:
    """Starts, watches and stops the worker processes of one ``pgveil serve``, and picks the process
    each new client goes to."""

    def __init__(
        self,
        config_path: Path,
        upstream: str | None,
        count: int,
        on_balance: Callable[[], None] | None = None,
    ) -> None:
        self.config_path = config_path
        self.upstream = upstream
        self.count = count
        self.merged: MergedRegistry | None = None
        self.links: dict[int, WorkerLink] = {}
        self._on_balance = on_balance
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._turn = 0  # ties go round-robin, so equal processes take turns
        self._request_ids = itertools.count(1)
        self.request_timeout = REQUEST_TIMEOUT

    def attach(self, registry: CollectorRegistry) -> MergedRegistry:
        self.merged = MergedRegistry(registry)
        return self.merged

    async def start(self) -> None:
        for slot in range(1, self.count):
            self._tasks.append(asyncio.get_running_loop().create_task(self._keep_running(slot)))

    # -- placing clients -------------------------------------------------------------------------------
    def worker_sessions(self) -> int:
        return sum(link.sessions for link in self.links.values())

    def pick(self, local_sessions: int) -> WorkerLink | None:
        """The ready worker with the fewest sessions, or None when the supervisor has no more than any."""
        candidates: list[tuple[int, int, WorkerLink | None]] = [(local_sessions, 0, None)]
        for link in self.links.values():
            if link.ready:
                candidates.append((link.sessions, link.slot, link))
        fewest = min(c[0] for c in candidates)
        tied = [c for c in candidates if c[0] == fewest]
        self._turn += 1
        return tied[self._turn % len(tied)][2]

    def hand_off(self, link: WorkerLink, conn: socket.socket, session_id: int) -> bool:
        """Passes an accepted connection to ``link``'s worker, to be session ``session_id`` there; False
        (and nothing passed) when its socket cannot take it now, so the caller serves the client itself."""
        try:
            sent = socket.send_fds(link.handoff, [control.HANDOFF.pack(b"C", session_id)], [conn.fileno()])
        except OSError as exc:  # BlockingIOError: the worker is not reading; others: it is gone
            log.warning("worker %d could not take a client (%s); serving it here", link.slot, type(exc).__name__)
            return False
        if sent != control.HANDOFF.size:  # cannot happen on a Unix stream socket with room for 9 bytes
            self._distrust(link, "a hand-off cut short")
            return False
        link.sessions += 1
        self._balance_changed()
        return True

    def _balance_changed(self) -> None:
        if self._on_balance is not None:
            self._on_balance()  # the caller reads the counts from ``links``

    # -- the processes ---------------------------------------------------------------------------------
    async def _keep_running(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            read_fd, write_fd = os.pipe()  # reports: worker -> supervisor
            req_read, req_write = os.pipe()  # requests: supervisor -> worker
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path), "--worker",
                    "--metrics-fd", str(write_fd), "--handoff-fd", str(theirs.fileno()),
                    "--control-fd", str(req_read), "--worker-slot", str(slot),
                    "--log-level", logsetup.current_level()]  # fmt: skip
            if self.upstream:
                argv += ["--upstream", self.upstream]
            try:
                proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(write_fd, theirs.fileno(), req_read))
            except BaseException:
                for fd in (read_fd, req_write):
                    os.close(fd)
                ours.close()
                raise
            finally:
                os.close(write_fd)
                os.close(req_read)
                theirs.close()
            link = WorkerLink(slot, proc, ours)
            self.links[slot] = link
            log.info("worker %d started (pid %d)", slot, proc.pid)
            requests, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(req_write, "wb"))
            link.requests = requests
            link.tasks.append(loop.create_task(self._read_reports(link, read_fd)))
            rc = await proc.wait()
            for t in link.tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self.links.pop(slot, None)
            self._end_requests(link)
            requests.close()
            ours.close()
            self._balance_changed()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again", slot, proc.pid, rc)
            await asyncio.sleep(1.0)

    async def _read_reports(self, link: WorkerLink, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=control.MAX_REPORT)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
        decoder = control.FrameDecoder(control.MAX_REPORT, control.REPORTS)
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    if decoder.pending:
                        log.warning("worker %d: its last report was cut short", link.slot)
                    return
                try:
                    for report in decoder.feed(data):
                        self._on_report(link, report)
                except ControlError as e:
                    self._distrust(link, str(e))
                    return
        finally:
            link.ready = False
            self._end_requests(link)
            transport.close()

    def _on_report(self, link: WorkerLink, report: dict[str, Any]) -> None:
        kind = report["t"]
        if kind == "closed":
            link.sessions = max(0, link.sessions - 1)
            self._balance_changed()
        elif kind == "ready":
            link.ready = True
            log.info("worker %d ready", link.slot)
        elif kind == "metrics":
            if self.merged is not None:
                self.merged.workers[link.slot] = report["m"]
        else:  # a reply
            entry = link.pending.pop(report["id"], None)
            if entry is None:
                log.debug("worker %d answered request %d after its time", link.slot, report["id"])
                return
            what, answer = entry
            if (err := control.reply_error(report)) is not None:
                log.warning("worker %d could not answer a %s request: %s", link.slot, what, err)
                value: Any = None
            elif what == "sessions":
                value = control.parse_sessions(report, link.slot)
            elif what == "terminate":
                value = control.parse_terminated(report)
            else:
                value = control.parse_level(report)
            if not answer.done():
                answer.set_result(value)

    def _distrust(self, link: WorkerLink, why: str) -> None:
        """A worker that broke the control protocol: killed (and so started again), its answers dropped."""
        if link.distrusted:
            return
        link.distrusted = True
        link.ready = False
        log.error("worker %d sent %s; it is not trusted any more and is restarted", link.slot, why)
        with contextlib.suppress(ProcessLookupError):
            link.proc.kill()
        self._end_requests(link)

    @staticmethod
    def _end_requests(link: WorkerLink) -> None:
        for _, answer in link.pending.values():
            if not answer.done():
                answer.set_result(None)
        link.pending.clear()

    # -- asking the workers (proxy.services.WorkerControl) ---------------------------------------------
    async def _ask(self, link: WorkerLink, request: dict[str, Any]) -> Any:
        """The checked answer of ``link``'s worker to ``request``, or None if it did not answer in time."""
        pipe = link.requests
        if pipe is None or pipe.is_closing() or link.distrusted or pipe.get_write_buffer_size() > _PIPE_BACKLOG:
            return None
        rid = next(self._request_ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending[rid] = (request["t"], answer)
        if request["t"] != "log_level":  # a level is taken however late; the others expire with the wait
            request = {**request, "until": time.monotonic() + self.request_timeout}
        try:
            pipe.write(control.encode({**request, "id": rid}, control.MAX_REQUEST))
            return await asyncio.wait_for(answer, self.request_timeout)
        except TimeoutError:
            log.warning("worker %d did not answer a %s request within %.1f s", link.slot, request["t"],
                        self.request_timeout)  # fmt: skip
            return None
        finally:
            link.pending.pop(rid, None)

    async def _ask_all(self, request: dict[str, Any]) -> list[tuple[WorkerLink, Any]]:
        links = [link for _, link in sorted(self.links.items())]
        answers = await asyncio.gather(*(self._ask(link, request) for link in links))
        return list(zip(links, answers, strict=True))

    async def sessions(self) -> list[WorkerSessions]:
        out: list[WorkerSessions] = []
        for link, answer in await self._ask_all({"t": "sessions"}):
            listed: tuple[SessionInfo, ...] | None = answer
            out.append(WorkerSessions(link.slot, listed, link.sessions))
        return out

    async def terminate(self, session_id: int) -> WorkerTermination:
        answers = await self._ask_all({"t": "terminate", "session": session_id})
        for link, terminated in answers:
            if terminated:
                return WorkerTermination(link.slot)
        return WorkerTermination(None, tuple(link.slot for link, a in answers if a is None))

    async def log_levels(self, level: str | None = None, source: str = "api") -> Mapping[int, str | None]:
        answers = await self._ask_all({"t": "log_level", "level": level, "source": source})
        return {link.slot: answer for link, answer in answers}

    def signal(self, sig: int) -> None:
        for link in self.links.values():
            with contextlib.suppress(ProcessLookupError):
                link.proc.send_signal(sig)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        for link in self.links.values():
            link.ready = False  # no more clients for anyone
        self.signal(signal.SIGTERM)
        procs = [link.proc for link in self.links.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for t in self._tasks:
            t.cancel()


class _PipeProtocol(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[], None], on_data: Callable[[bytes], None] | None = None) -> None:
        self._on_lost = on_lost
        self._on_data = on_data

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


Request = Mapping[str, Any]


class WorkerChannel:
    """A worker's side: clients arrive on the hand-off socket, requests on the control pipe, and reports
    and replies leave on the report pipe. Any of them breaking, or the supervisor sending anything but
    well-formed frames, means the supervisor is gone, and ``on_orphaned()`` is called (once).
    ``on_request(request)`` answers a checked request (the reply's fields)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        report_fd: int,
        handoff_fd: int,
        on_client: Callable[[socket.socket, int], None],
        on_orphaned: Callable[[], None],
        *,
        control_fd: int | None = None,
        on_request: Callable[[Request], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self._report_fd = report_fd
        self._control_fd = control_fd
        self._handoff = socket.socket(fileno=handoff_fd)
        self._handoff.setblocking(False)
        self._handoffs = control.HandoffDecoder()
        self._requests = control.FrameDecoder(control.MAX_REQUEST, control.REQUESTS)
        self._on_client = on_client
        self._on_request = on_request
        self._on_orphaned = on_orphaned
        self._orphaned = False
        self._reports: asyncio.WriteTransport | None = None
        self._control: asyncio.BaseTransport | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Opens the pipes, says ``ready``, and starts taking clients and requests."""
        loop = self._loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_write_pipe(
            lambda: _PipeProtocol(self._lost), os.fdopen(self._report_fd, "wb")
        )
        self._reports = transport
        if self._control_fd is not None:
            self._control, _ = await loop.connect_read_pipe(
                lambda: _PipeProtocol(self._lost, self._on_control_data), os.fdopen(self._control_fd, "rb")
            )
        self._send({"t": "ready"})
        loop.add_reader(self._handoff.fileno(), self._on_handoff_readable)
        self._ticker = loop.create_task(self._send_metrics_periodically())

    def session_closed(self) -> None:
        self._send({"t": "closed"})

    def stop_taking_clients(self) -> None:
        if self._loop is not None and self._handoff.fileno() >= 0:
            self._loop.remove_reader(self._handoff.fileno())

    def close(self) -> None:
        """A last metrics snapshot, then both channels closed."""
        self._orphaned = True  # closing our end is not the supervisor going away
        self.stop_taking_clients()
        if self._ticker is not None:
            self._ticker.cancel()
        self._send({"t": "metrics", "m": snapshot(self.registry)})
        if self._control is not None:
            self._control.close()
        if self._reports is not None:
            self._reports.close()
        self._handoff.close()

    def _send(self, report: dict[str, Any]) -> bool:
        if self._reports is None or self._reports.is_closing():
            return False
        try:
            frame = control.encode(report, control.MAX_REPORT)
        except ControlError as e:
            log.warning("not sent to the supervisor: %s", e)
            return False
        self._reports.write(frame)
        return True

    async def _send_metrics_periodically(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._send({"t": "metrics", "m": snapshot(self.registry)})

    def _on_control_data(self, data: bytes) -> None:
        try:
            requests = self._requests.feed(data)
        except ControlError as e:
            log.error("the supervisor sent %s; this worker stops", e)
            self._lost()
            return
        for request in requests:
            try:
                if "until" in request and time.monotonic() > request["until"]:
                    body = {"error": "the request expired before this worker read it"}
                elif self._on_request is None:
                    body = {"error": "no answers here"}
                else:
                    body = self._on_request(request)
            except Exception as e:  # the request is checked; an answer failing is this worker's bug
                log.error("answering a %s request failed (%s)", request["t"], type(e).__name__)
                body = {"error": f"answering failed ({type(e).__name__})"}
            if not self._send({**body, "t": "reply", "id": request["id"]}):
                self._send({"t": "reply", "id": request["id"], "error": "the answer is over the size limit"})

    def _on_handoff_readable(self) -> None:
        size = control.HANDOFF.size
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._handoff, size * 28, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        try:
            clients = self._handoffs.feed(data, fds)
        except ControlError as e:
            for fd in {*fds, *self._handoffs.leftover_fds()}:  # none was handed on yet
                with contextlib.suppress(OSError):
                    os.close(fd)
            log.error("the supervisor sent %s; this worker stops", e)
            self._lost()
            return
        for sid, fd in clients:
            self._on_client(socket.socket(fileno=fd), sid)
        if not data:
            self._lost()

    def _lost(self) -> None:
        if self._orphaned:
            return
        self._orphaned = True
        self.stop_taking_clients()
        log.error("the supervisor is gone; this worker stops")
        self._on_orphaned()
