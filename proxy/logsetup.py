"""Logging for the ``pgveil`` process: one line per event on stderr, as text or as one JSON object.

What it owns: the handler and its formatters, the session id of the session being served (a context
variable the session sets around its work, so a line logged deep in the relay or the engine carries the
session it belongs to), and the level, which changes at runtime (a reload of ``logging.level``, the admin
API's ``PUT /v1/logging``) and counts each change (``pgveil_log_level_changes_total``).

What it must not do: add anything a record did not bring. Modules never log statement text, parameters,
row data, keys or passwords (STYLE.md); structured fields come as ``extra=`` and must be just as clean.
An exception is shown by its type name only, never its text, arguments or traceback, in either format:
an exception's message or a frame's repr can quote a value (a literal the parser choked on, a DSN).

Text: ``2026-12-02T07:00:00.123Z INFO proxy.session [s12] session started role=app database=app ...``
(``[s<id>]`` is the id ``GET /v1/sessions`` lists). JSON: ``{"ts", "level", "logger", "msg", "session",
...the extra fields..., "exc_type"}``. A worker process of ``sessions.workers`` adds ``worker=<N>`` (JSON:
``"worker": N``) to each of its lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

LEVELS: Final = ("debug", "info", "warning", "error")
FORMATS: Final = ("text", "json")

# The session whose work the current code does; set by proxy.session around every callback and task.
current_session: contextvars.ContextVar[int | None] = contextvars.ContextVar("pgveil_session", default=None)

# Every attribute a LogRecord has of its own; anything else on a record came through ``extra=``.
_RECORD_FIELDS: Final = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName", "session"}
)


def _fields(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    for key, value in record.__dict__.items():
        if key not in _RECORD_FIELDS and not key.startswith("_"):
            yield key, value


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _exc_type(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        return record.exc_info[0].__name__
    return None


def _session(record: logging.LogRecord) -> int | None:
    sid = record.__dict__.get("session")
    return sid if isinstance(sid, int) else None


_worker: int | None = None  # this process's worker number (sessions.workers), None in the supervisor


def set_worker(slot: int | None) -> None:
    """Marks every line of this process from now on with ``worker=<slot>``."""
    global _worker
    _worker = slot


class SessionFilter(logging.Filter):
    """Gives every record logged while a session's code runs that session's id (``record.session``),
    unless the call passed one itself; and in a worker process, the worker's number (``record.worker``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get("session") is None:
            record.session = current_session.get()
        if _worker is not None and "worker" not in record.__dict__:
            record.worker = _worker
        return True


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> [s<session>] <message> key=value ... exc=<type>``, one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name]
        sid = _session(record)
        if sid is not None:
            parts.append(f"[s{sid}]")
        parts.append(record.getMessage().replace("\n", "\\n"))
        parts.extend(f"{k}={_text_value(v)}" for k, v in _fields(record))
        exc = _exc_type(record)
        if exc is not None:
            parts.append(f"exc={exc}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, session (when in a session), the ``extra=``
    fields, exc_type (the exception's type name only)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        sid = _session(record)
        if sid is not None:
            doc["session"] = sid
        for key, value in _fields(record):
            doc.setdefault(key, value)
        exc = _exc_type(record)
        if exc is not None:
            doc["exc_type"] = exc
        return json.dumps(doc, default=str, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class LevelChange:
    """What :func:`set_level` did: the level before and after (equal: nothing changed)."""

    previous: str
    level: str

    @property
    def changed(self) -> bool:
        return self.previous != self.level


_changes: dict[str, int] = {}  # source -> level changes, for pgveil_log_level_changes_total
_log = logging.getLogger(__name__)


def level_changes() -> Mapping[str, int]:
    """Level changes of this process by source (``reload``, ``api``)."""
    return dict(_changes)


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()


def _check_level(level: str) -> str:
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    return name


def set_level(level: str, *, source: str) -> LevelChange:
    """Sets the level of every pgveil logger from now on; a change is counted by ``source`` and logged
    (at warning, so the line is seen at any level)."""
    name = _check_level(level)
    previous = current_level()
    logging.getLogger().setLevel(name.upper())
    change = LevelChange(previous, name)
    if change.changed:
        _changes[source] = _changes.get(source, 0) + 1
        _log.warning(
            "log level changed from %s to %s (%s)",
            previous,
            name,
            source,
            extra={"event": "log_level", "previous": previous, "level": name, "source": source},
        )
    return change


def setup_logging(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Installs the one handler of the process (replacing any), on stderr; the first call of a process."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (one of {', '.join(FORMATS)})")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(SessionFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_check_level(level).upper())


def reconfigure(level: str, fmt: str, *, source: str = "reload") -> LevelChange:
    """A reload: the format as configured (a new handler only if it changed) and the level, counted as
    a change when it differs from the running one."""
    root = logging.getLogger()
    handler = root.handlers[0] if len(root.handlers) == 1 else None
    want = JsonFormatter if fmt == "json" else TextFormatter
    if handler is None or type(handler.formatter) is not want:
        level_now = current_level()
        setup_logging(level_now, fmt)
    return set_level(level, source=source)


def loop_exception_handler(loop: Any, context: Mapping[str, Any]) -> None:
    """The event loop's handler for exceptions nobody retrieved: asyncio's default logs the exception's
    repr and the task's (which may quote a value); this one logs their type names only."""
    exc = context.get("exception")
    what = context.get("message") or "unhandled exception in the event loop"
    future = context.get("future") or context.get("task")
    _log.error(
        "%s: %s%s",
        what,
        type(exc).__name__ if exc is not None else "no exception",
        f" in {type(future).__name__}" if future is not None else "",
        extra={"event": "loop_exception"},
    )
