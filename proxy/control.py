"""The control channel between a supervisor and its worker processes (``sessions.workers``): the frames,
the messages they carry, and what each message may contain. Pure: bytes in, checked messages out; the
pipes and sockets are :mod:`proxy.workers`'.

A frame is a 4-byte big-endian length and that many bytes of one UTF-8 JSON object with a type ``t``.
Each direction has a size limit (:data:`MAX_REPORT`, :data:`MAX_REQUEST`) checked on the length before a
byte of the body is buffered, so a peer cannot make the other side hold or parse more than that. Anything
that is not a frame of a known message with fields of the right types raises :class:`ControlError`; the
supervisor then stops trusting the worker (it is logged and restarted) and a worker stops.

Worker to supervisor ("reports"): ``ready``; ``closed`` (one session ended); ``metrics`` (``m``: a
:func:`proxy.workers.snapshot`); ``reply`` (``id``: the request's, then the answer's fields, or
``error``). Supervisor to worker ("requests", each with an ``id`` its reply carries): ``sessions`` (the
worker's sessions, described as in ``GET /v1/sessions``), ``terminate`` (``session``: an id; answers
``terminated``), ``log_level`` (``level``: set it, or null to ask; ``source``: as counted by the
supervisor; answers ``level``). ``sessions`` and ``terminate`` carry ``until``, a ``time.monotonic()``
deadline (the clock is the machine's, shared by its processes): a worker that reads one later answers
``error`` and does nothing, so a termination the API reported unanswered does not happen behind its back.
A ``log_level`` has no deadline: a worker busy for a while still takes the level when it reads it.

A handed-off client connection travels on its own socket (``SCM_RIGHTS``): one :data:`HANDOFF` record per
descriptor, ``C`` and the session id the supervisor gave it, so session ids are unique over all processes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, Final

from proxy import logsetup
from proxy.services import SessionInfo, SessionState

HEADER: Final = struct.Struct(">I")
MAX_REPORT: Final = 8 << 20  # worker -> supervisor: a metrics snapshot or a session list is the largest
MAX_REQUEST: Final = 64 << 10  # supervisor -> worker: requests are small
HANDOFF: Final = struct.Struct(">cQ")  # b"C", the session id
MAX_SESSION_ID: Final = (1 << 63) - 1

REPORTS: Final = frozenset({"ready", "closed", "metrics", "reply"})
REQUESTS: Final = frozenset({"sessions", "terminate", "log_level"})
_LEVEL_SOURCES: Final = frozenset({"api", "reload"})


class ControlError(Exception):
    """The peer sent something that is not a control message (its text names what, never the bytes)."""


def encode(message: Mapping[str, Any], limit: int) -> bytes:
    """One frame; :class:`ControlError` if the message is over ``limit`` once encoded."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > limit:
        raise ControlError(f"a {message.get('t')} message of {len(body)} bytes is over the limit of {limit}")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes as they arrive in, whole messages out. After an error it refuses everything: the stream can
    no longer be trusted to be at a frame boundary."""

    def __init__(self, limit: int, kinds: frozenset[str]) -> None:
        self.limit = limit
        self.kinds = kinds
        self._buffer = bytearray()
        self._failed: str | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._failed is not None:
            raise ControlError(self._failed)
        self._buffer += data
        out: list[dict[str, Any]] = []
        try:
            while len(self._buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(self._buffer)
                if size > self.limit:
                    raise ControlError(f"a message of {size} bytes announced, over the limit of {self.limit}")
                if len(self._buffer) < HEADER.size + size:
                    break
                body = bytes(self._buffer[HEADER.size : HEADER.size + size])
                del self._buffer[: HEADER.size + size]
                out.append(self._message(body))
        except ControlError as e:
            self._failed = str(e)
            self._buffer.clear()
            raise
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (at the end of a stream: a message cut short)."""
        return len(self._buffer)

    def _message(self, body: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ControlError("a message that is not UTF-8 JSON") from None
        if not isinstance(msg, dict):
            raise ControlError("a message that is not a JSON object")
        kind = msg.get("t")
        if not isinstance(kind, str) or kind not in self.kinds:
            raise ControlError("a message of no known type")
        if kind in ("reply", *REQUESTS) and not _is_int(msg.get("id"), 0, MAX_SESSION_ID):
            raise ControlError(f"a {kind} message without a request id")
        if kind == "metrics":
            check_snapshot(msg.get("m"))
        if kind == "log_level":
            level, source = msg.get("level"), msg.get("source")
            if (level is not None and level not in logsetup.LEVELS) or source not in _LEVEL_SOURCES:
                raise ControlError("a log_level request with an unknown level or source")
        if kind == "terminate" and not _is_int(msg.get("session"), 0, MAX_SESSION_ID):
            raise ControlError("a terminate request without a session id")
        until = msg.get("until")
        if kind in ("sessions", "terminate") and (isinstance(until, bool) or not isinstance(until, int | float)):
            raise ControlError(f"a {kind} request without a deadline")
        return msg


def _is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _opt_str(v: Any, limit: int = 1024) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= limit)


def check_snapshot(snap: Any) -> dict[str, dict[str, float]]:
    """A worker's metrics: family -> ``"<sample name>|<labels as a JSON list of pairs>"`` -> number."""
    if not isinstance(snap, dict):
        raise ControlError("metrics that are not an object")
    for family, samples in snap.items():
        if not isinstance(samples, dict):
            raise ControlError("metrics whose family is not an object")
        for key, value in samples.items():
            name, sep, labels = key.partition("|")
            if not sep or not name.startswith(family) or isinstance(value, bool) or not isinstance(value, int | float):
                raise ControlError("a metrics sample that is not name|labels: number")
            try:
                pairs = json.loads(labels)
            except (ValueError, RecursionError):
                raise ControlError("a metrics sample whose labels are not JSON") from None
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
            ):
                raise ControlError("a metrics sample whose labels are not name/value pairs")
    return snap


def parse_sessions(reply: Mapping[str, Any], process: int) -> tuple[SessionInfo, ...]:
    """The sessions a worker listed, as :class:`SessionInfo` of process ``process`` (the supervisor's
    number for it: what the worker says about itself is not taken)."""
    items = reply.get("sessions")
    if not isinstance(items, list):
        raise ControlError("a sessions reply without a list of sessions")
    states = {s.value: s for s in SessionState}
    out: list[SessionInfo] = []
    for item in items:
        if not isinstance(item, dict):
            raise ControlError("a session that is not an object")
        state = item.get("state")
        ok = (
            _is_int(item.get("id"), 0, MAX_SESSION_ID)
            and _opt_str(item.get("role"))
            and _opt_str(item.get("database"))
            and _opt_str(item.get("client_address"), 4096)
            and (item.get("client_port") is None or _is_int(item.get("client_port"), 0, 65535))
            and isinstance(item.get("started_at"), str)
            and len(item["started_at"]) <= 64
            and isinstance(state, str)
            and state in states
            and isinstance(item.get("tls"), bool)
        )
        if not ok:
            raise ControlError("a session whose fields are not those of a session")
        out.append(
            SessionInfo(
                id=item["id"],
                role=item["role"],
                database=item["database"],
                client_address=item["client_address"],
                client_port=item["client_port"],
                started_at=item["started_at"],
                state=states[str(state)],
                tls=item["tls"],
                process=process,
            )
        )
    return tuple(out)


def parse_terminated(reply: Mapping[str, Any]) -> bool:
    value = reply.get("terminated")
    if not isinstance(value, bool):
        raise ControlError("a terminate reply without terminated: true|false")
    return value


def parse_level(reply: Mapping[str, Any]) -> str:
    level = reply.get("level")
    if not isinstance(level, str) or level not in logsetup.LEVELS:
        raise ControlError("a log_level reply without a known level")
    return level


def reply_error(reply: Mapping[str, Any]) -> str | None:
    """The worker's reason for not answering (e.g. its answer was over the size limit), if it gave one."""
    err = reply.get("error")
    if err is None:
        return None
    if not isinstance(err, str):
        raise ControlError("a reply whose error is not text")
    return err[:200]


class HandoffDecoder:
    """The worker's side of the hand-off socket: records and descriptors in, (session id, fd) pairs out.
    The kernel delivers a descriptor with the first byte of the record it was sent with, so the n-th
    complete record goes with the n-th descriptor."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[int, int]]:
        self._buffer += data
        self._fds += fds
        out: list[tuple[int, int]] = []
        while len(self._buffer) >= HANDOFF.size and self._fds:
            tag, sid = HANDOFF.unpack_from(self._buffer)
            del self._buffer[: HANDOFF.size]
            if tag != b"C" or sid > MAX_SESSION_ID:
                self._buffer.clear()
                raise ControlError("a hand-off record that is not C and a session id")
            out.append((sid, self._fds.pop(0)))
        if len(self._buffer) >= HANDOFF.size:  # a record without its descriptor
            self._buffer.clear()
            raise ControlError("a hand-off record without a descriptor")
        return out

    def leftover_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds
