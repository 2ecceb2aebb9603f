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

Only the supervisor runs the admin server. Each worker reports over a pipe, one JSON object per line:
``ready`` once it can serve, ``closed`` for every session it ended, and a snapshot of its metrics about
once a second; the supervisor's ``/metrics`` adds the snapshots to its own (counters, gauges and
histogram buckets are sums; ``process_*``/``python_*`` series and ``_created`` timestamps stay per
supervisor). SIGHUP and SIGTERM are passed on to the workers; a worker that dies is started again (the
clients it served lose their connections, as with any crashed server process); a worker whose supervisor
is gone (its pipe or socket breaks) shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

_PER_PROCESS = ("process_", "python_", "pgveil_build_info")
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

    def hand_off(self, link: WorkerLink, conn: socket.socket) -> bool:
        """Passes an accepted connection to ``link``'s worker; False (and nothing passed) when its socket
        cannot take it now, so the caller serves the client itself."""
        try:
            socket.send_fds(link.handoff, [b"C"], [conn.fileno()])
        except OSError as exc:  # BlockingIOError: the worker is not reading; others: it is gone
            log.warning("worker %d could not take a client (%s); serving it here", link.slot, type(exc).__name__)
            return False
        link.sessions += 1
        self._balance_changed()
        return True

    def _balance_changed(self) -> None:
        if self._on_balance is not None:
            self._on_balance()  # the caller reads the counts from ``links``

    # -- the processes ---------------------------------------------------------------------------------
    async def _keep_running(self, slot: int) -> None:
        while not self._stopping:
            read_fd, write_fd = os.pipe()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path), "--worker",
                    "--metrics-fd", str(write_fd), "--handoff-fd", str(theirs.fileno())]  # fmt: skip
            if self.upstream:
                argv += ["--upstream", self.upstream]
            try:
                proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(write_fd, theirs.fileno()))
            finally:
                os.close(write_fd)
                theirs.close()
            link = WorkerLink(slot, proc, ours)
            self.links[slot] = link
            log.info("worker %d started (pid %d)", slot, proc.pid)
            link.tasks.append(asyncio.get_running_loop().create_task(self._read_reports(link, read_fd)))
            rc = await proc.wait()
            for t in link.tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self.links.pop(slot, None)
            ours.close()
            self._balance_changed()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again", slot, proc.pid, rc)
            await asyncio.sleep(1.0)

    async def _read_reports(self, link: WorkerLink, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                if "closed" in report:
                    link.sessions = max(0, link.sessions - int(report["closed"]))
                    self._balance_changed()
                elif "ready" in report:
                    link.ready = True
                    log.info("worker %d ready", link.slot)
                elif "metrics" in report and self.merged is not None:
                    self.merged.workers[link.slot] = report["metrics"]
        finally:
            link.ready = False
            transport.close()

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


class _ReportProtocol(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[], None]) -> None:
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class WorkerChannel:
    """A worker's side: clients arrive on the hand-off socket, reports leave on the pipe. Either one
    breaking means the supervisor is gone, and ``on_orphaned()`` is called (once)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        report_fd: int,
        handoff_fd: int,
        on_client: Callable[[socket.socket], None],
        on_orphaned: Callable[[], None],
    ) -> None:
        self.registry = registry
        self._report_fd = report_fd
        self._handoff = socket.socket(fileno=handoff_fd)
        self._handoff.setblocking(False)
        self._on_client = on_client
        self._on_orphaned = on_orphaned
        self._orphaned = False
        self._reports: asyncio.WriteTransport | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Opens the report pipe, says ``ready``, and starts taking clients."""
        loop = self._loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_write_pipe(
            lambda: _ReportProtocol(self._lost), os.fdopen(self._report_fd, "wb")
        )
        self._reports = transport
        self._send({"ready": 1})
        loop.add_reader(self._handoff.fileno(), self._on_handoff_readable)
        self._ticker = loop.create_task(self._send_metrics_periodically())

    def session_closed(self) -> None:
        self._send({"closed": 1})

    def stop_taking_clients(self) -> None:
        if self._loop is not None and self._handoff.fileno() >= 0:
            self._loop.remove_reader(self._handoff.fileno())

    def close(self) -> None:
        """A last metrics snapshot, then both channels closed."""
        self._orphaned = True  # closing our end is not the supervisor going away
        self.stop_taking_clients()
        if self._ticker is not None:
            self._ticker.cancel()
        self._send({"metrics": snapshot(self.registry)})
        if self._reports is not None:
            self._reports.close()
        self._handoff.close()

    def _send(self, report: dict[str, Any]) -> None:
        if self._reports is not None and not self._reports.is_closing():
            self._reports.write(json.dumps(report).encode() + b"\n")

    async def _send_metrics_periodically(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._send({"metrics": snapshot(self.registry)})

    def _on_handoff_readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._handoff, 256, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:
            self._on_client(socket.socket(fileno=fd))
        if not data:
            self._lost()

    def _lost(self) -> None:
        if self._orphaned:
            return
        self._orphaned = True
        self.stop_taking_clients()
        log.error("the supervisor is gone; this worker stops")
        self._on_orphaned()
