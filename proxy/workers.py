"""Several processes serving sessions (``sessions.workers``), for machines where one Python process is
the bottleneck (the per-value decryption of wide results, for instance).

The first process (the supervisor) binds the listen addresses and serves sessions itself; it starts
``workers - 1`` worker processes (``pgveil serve --worker``) that accept on the same listening sockets
(inherited file descriptors), so whichever process is free accepts the next client. Sessions are 1:1
with server connections and keep no shared state, so any process can serve any client (and forward any
CancelRequest).

Only the supervisor runs the admin server. Each worker sends a snapshot of its metrics about once a
second over a pipe; the supervisor's ``/metrics`` adds them to its own (counters, gauges and histogram
buckets are sums; ``process_*``/``python_*`` series and ``_created`` timestamps stay per supervisor).
SIGHUP and SIGTERM are passed on to the workers; a worker that dies is started again; a worker whose
supervisor is gone (its pipe breaks) shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator
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


class Supervisor:
    """Starts, watches and stops the worker processes of one ``pgveil serve``."""

    def __init__(self, config_path: Path, listen_fds: Iterable[int], upstream: str | None, count: int) -> None:
        self.config_path = config_path
        self.listen_fds = list(listen_fds)
        self.upstream = upstream
        self.count = count
        self.merged: MergedRegistry | None = None
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def attach(self, registry: CollectorRegistry) -> MergedRegistry:
        self.merged = MergedRegistry(registry)
        return self.merged

    async def start(self) -> None:
        for slot in range(1, self.count):
            self._tasks.append(asyncio.get_running_loop().create_task(self._keep_running(slot)))

    async def _keep_running(self, slot: int) -> None:
        while not self._stopping:
            read_fd, write_fd = os.pipe()
            argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path), "--worker",
                    "--metrics-fd", str(write_fd)]  # fmt: skip
            for fd in self.listen_fds:
                argv += ["--listen-fd", str(fd)]
            if self.upstream:
                argv += ["--upstream", self.upstream]
            proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(write_fd, *self.listen_fds))
            os.close(write_fd)
            self._procs[slot] = proc
            log.info("worker %d started (pid %d)", slot, proc.pid)
            reader = asyncio.get_running_loop().create_task(self._read_metrics(slot, read_fd))
            rc = await proc.wait()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._procs.pop(slot, None)
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again", slot, proc.pid, rc)
            await asyncio.sleep(1.0)

    async def _read_metrics(self, slot: int, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if self.merged is not None:
                    with contextlib.suppress(ValueError):
                        self.merged.workers[slot] = json.loads(line)
        finally:
            transport.close()

    def signal(self, sig: int) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        self.signal(signal.SIGTERM)
        procs = list(self._procs.values())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for t in self._tasks:
            t.cancel()


async def report_metrics(registry: CollectorRegistry, fd: int, on_orphaned: Any) -> None:
    """A worker's side: a snapshot a second to the supervisor; ``on_orphaned()`` when the pipe breaks."""
    os.set_blocking(fd, False)
    pending = b""  # the unwritten rest of a snapshot: lines are never interleaved or cut
    try:
        while True:
            await asyncio.sleep(1.0)
            if not pending:
                pending = json.dumps(snapshot(registry)).encode() + b"\n"
            try:
                pending = pending[os.write(fd, pending) :]
            except BlockingIOError:
                continue  # the supervisor is busy; the rest goes next time
            except OSError:
                log.error("the supervisor is gone; this worker stops")
                on_orphaned()
                return
    finally:
        os.close(fd)
