"""The seam between the relay and the encryption layer, declared on the protocol side.

The relay (:mod:`proxy.protocol.relay`) knows framing, the phase, the expected-reply queue, statements and
portals; it knows nothing about columns or keys. Everything it needs from the encryption layer is the
:class:`SessionEncryption` protocol below, which :class:`proxy.encrypt.engine.SessionCrypto` implements.
The relay calls it only for the messages it acts on and only when a session has an encryption layer, so
pass-through sessions pay nothing for it.

What crosses the seam:

* :class:`Outcome`: a frontend message after the encryption layer has seen it (bytes to send instead,
  the state to keep with the pending reply, and the ErrorResponse to show when the message was refused).
* :class:`CryptoState`: opaque to the relay. The encryption layer hands one out with an Outcome, the
  relay keeps it with the matching :class:`~proxy.protocol.relay.Pending` entry and gives it back when
  the reply arrives, so replies meet the plan of the request they answer.
* Statement and portal state: the layer keeps the crypto state of every statement and portal the
  server has confirmed; the relay commits it on the server's reply (``set_statement`` on ParseComplete,
  ``set_portal`` on BindComplete, ``close`` and ``close_all`` when they are gone) and, for a message sent
  before earlier ones are answered, passes every :data:`Version` the name may have when it runs, so the
  layer can refuse instead of guessing.
* :class:`NamespaceOp`: SQL-level PREPARE, EXECUTE, DEALLOCATE [ALL] and DISCARD ALL found in a text,
  which the relay applies on their CommandComplete.
* :class:`KeyMiss`: raised by the encryption layer when a key is not in memory; the relay holds that
  side of the stream and asks the session to fetch it, then retries the message from scratch.
* :class:`AnalysisMiss`: the same for a long statement whose analysis must run off the event loop.
* :class:`ValuesMiss`: the same for values the server must make first (generated subject ids): the relay
  runs a query of pgveil's own on the session's server connection.
* The stand-ins: a refused message is replaced by one that makes the server fail at the same protocol
  step (so its error handling, transaction state and pipeline semantics stay exact), and the relay
  replaces the server's error with the refusal.

This module imports nothing from :mod:`proxy.encrypt`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from proxy.errors import ProxyError, RefusalReason
from proxy.protocol import messages as m

# Stand-ins sent instead of a refused message: each makes the server fail at the same protocol step.
REFUSED_QUERY = "pgveil_refused_statement"
REFUSED_STATEMENT_NAME = "\x01pgveil refused"
REFUSED_PORTAL_NAME = "\x01pgveil refused"
# A client can create a statement or a portal of any name (a Parse, a Bind, SQL PREPARE, DECLARE), these
# too, so a stand-in that only names one could run the client's own and succeed, the refusal unreported.
# A refused Bind or Execute is therefore replaced by a Bind that fails whatever the session holds: two
# parameter format codes for no parameters (exec_bind_message rejects that before it makes a portal).
REFUSED_PARAMETER_FORMATS = (0, 0)


def refused_bind(portal: str = REFUSED_PORTAL_NAME) -> m.Bind:
    """The stand-in for a refused Bind (of ``portal``) or Execute: a Bind the server always rejects."""
    return m.Bind(portal, REFUSED_STATEMENT_NAME, REFUSED_PARAMETER_FORMATS, (), ())


class KeyMiss(Exception):
    """Raised by the encryption layer when a key is not in memory: the relay holds that side of the
    stream and asks the session (NeedKey) to fetch it."""

    def __init__(
        self,
        *,
        key_id: bytes | None = None,
        column_id: str | None = None,
        subject: object = None,
        key_ids: tuple[bytes, ...] = (),
    ) -> None:
        super().__init__("key not cached")
        self.key_id = key_id
        self.column_id = column_id
        self.subject = subject  # a data subject's key (keymgmt.envelope.Subject; opaque to the protocol layer)
        self.key_ids = key_ids  # every key id a held DataRow run needs and memory lacks: fetched in one query


class AnalysisMiss(Exception):
    """Raised by the encryption layer when a statement is too long to analyse on the event loop and its
    plan is not cached: the relay holds the client's stream (as for :class:`KeyMiss`) and asks the
    session (NeedAnalysis) to run ``function(*arguments)`` in a worker process, hand the result (or the
    exception) to ``deliver`` and resume; the retried message then finds its plan. ``arguments`` hold
    the statement text: never log them."""

    def __init__(
        self, function: Callable[..., object], args: tuple[object, ...], deliver: Callable[[object], None]
    ) -> None:
        super().__init__("analysis not cached")
        self.function = function
        self.arguments = args
        self.deliver = deliver


class ValuesMiss(Exception):
    """Raised by the encryption layer for an INSERT that leaves a subject column to the database: the
    relay holds the client's stream (as for :class:`KeyMiss`), runs ``query`` on the client's own server
    connection once every earlier reply is in (a statement of pgveil's own whose replies the client never
    sees), hands the first column of its rows, as text, to ``deliver`` and retries the message, which then
    finds them. If the query fails, the client gets the server's error in place of the held message's
    replies and the message is dropped. ``query`` is pgveil's, built from the catalog (never logged with
    values: it holds none)."""

    def __init__(self, query: str, rows: int, deliver: Callable[[list[str]], None]) -> None:
        super().__init__("generated values needed")
        self.query = query
        self.rows = rows
        self.deliver = deliver


class CryptoState:
    """What the encryption layer keeps about one statement, portal or simple Query. The relay stores it
    and hands it back; it never looks inside."""

    __slots__ = ()


class NamespaceAction(Enum):
    """What an SQL statement does to the session's prepared statements (PostgreSQL docs, "PREPARE",
    "EXECUTE", "DEALLOCATE", "DISCARD")."""

    PREPARE = auto()  # creates ``name`` (fails if it exists); CommandComplete "PREPARE"
    EXECUTE = auto()  # runs ``name`` with SQL-level arguments
    DEALLOCATE = auto()  # removes ``name``; CommandComplete "DEALLOCATE"
    DEALLOCATE_ALL = auto()  # DEALLOCATE ALL or DISCARD ALL: removes every statement
    # A DO block whose code runs SQL built at run time: it may have deallocated, prepared or replaced any
    # statement and cursor of the session without a reply saying so (CommandComplete "DO"), so none of
    # them is trusted after it.
    REPLACE_ALL = auto()


@dataclass(frozen=True, slots=True)
class NamespaceOp:
    action: NamespaceAction
    name: str = ""


# One possible version of a prepared statement or portal when a message runs: its crypto state and, for
# a statement, its RowDescription if it was described. A name that may not exist adds no version.
Version = tuple[CryptoState | None, bytes | None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A frontend message after rewriting: ``replacement`` (None = forward as is), the state to keep
    with the pending reply, and ``refusal`` (an encoded ErrorResponse) when it was refused."""

    replacement: bytes | None = None
    state: CryptoState | None = None
    refusal: bytes | None = None


class SessionEncryption(Protocol):
    """One session's encryption layer as the relay sees it. Frontend methods may raise :class:`KeyMiss`
    (the relay retries the message later, so they change nothing before they are sure to succeed);
    backend methods may raise :class:`KeyMiss` or a ``ProxyError`` (the reply cannot be delivered)."""

    # Set by the relay right before query() and parse(): whether any request is still unanswered.
    in_flight: bool
    # A COPY FROM STDIN rewriter is armed: the client's CopyData must be seen whole, not streamed.
    copy_in_armed: bool
    # Counters the session moves into metrics and resets.
    values_encrypted: int
    values_decrypted: int
    decrypt_failures: int
    refused: dict[tuple[RefusalReason, str], int]  # refusals by (reason, SQLSTATE)
    values_served: dict[tuple[str, str], int]  # governed values sent, by (policy role label, outcome)

    def set_parameter(self, name: str, value: str) -> None:
        """A ParameterStatus from the server."""

    def refusal(self, e: ProxyError) -> bytes:
        """The ErrorResponse that answers a message the relay refused (counted with the others)."""

    def ready_for_query(self, status: bytes) -> None:
        """A ReadyForQuery from the server (its transaction status byte)."""

    def server_error(self, fields: tuple[tuple[bytes, str], ...]) -> tuple[tuple[bytes, str], ...] | None:
        """A server ErrorResponse's fields as the client may see them, or None to pass it unchanged
        (an integrity error's DETAIL repeats row values, which a restricted role may not see)."""

    # -- frontend --------------------------------------------------------------------------------------
    def query(self, sql: str) -> Outcome:
        """A simple Query. The Outcome's state comes back with the replies."""

    def parse(self, msg: m.Parse) -> Outcome:
        """A Parse. The Outcome's state is the statement's crypto state (None: nothing protected)."""

    def sql_namespace(self, sql: str) -> tuple[NamespaceOp, ...]:
        """The statements of ``sql`` that touch the prepared-statement namespace, in text order."""

    def execute_refusal(self, name: str, versions: Sequence[Version], *, deferred: bool) -> bytes | None:
        """SQL-level EXECUTE of statement ``name``, which may be any of ``versions`` (none: pgveil does
        not know it) when it runs: the ErrorResponse refusing it, or None to let it run. ``deferred``: it
        is in a Parse, so it runs at some later Execute, when ``name`` may be another statement."""

    def handle_bind(self, msg: m.BindFrame, versions: Sequence[Version]) -> Outcome:
        """A Bind to a statement that may be any of ``versions`` when the server runs the Bind (none: a
        name pgveil does not know). The Outcome's state is the portal's, committed on BindComplete."""

    def handle_execute(self, portal: str, versions: Sequence[CryptoState | None]) -> Outcome:
        """An Execute of a portal that may be any of ``versions``; arms COPY FROM STDIN if it copies
        into a protected table."""

    def describe_portal(self, versions: Sequence[CryptoState | None]) -> None:
        """A Describe of a portal that may be any of ``versions`` was sent."""

    # -- the confirmed model: called when the server's reply says a name changed -----------------------
    def statement_state(self, name: str) -> CryptoState | None:
        """The crypto state of the confirmed statement ``name`` (None: nothing protected)."""

    def portal_state(self, name: str) -> CryptoState | None:
        """The crypto state of the confirmed portal ``name``."""

    def set_statement(self, name: str, state: CryptoState | None) -> None:
        """ParseComplete (or an SQL PREPARE's CommandComplete): ``name`` now has ``state``."""

    def set_portal(self, name: str, state: CryptoState | None) -> None:
        """BindComplete: the portal ``name`` now has ``state``."""

    def close(self, kind: bytes, name: str) -> None:
        """CloseComplete (or DEALLOCATE's CommandComplete) of a statement (``b"S"``) or portal."""

    def close_all(self, kind: bytes) -> None:
        """Every statement (DEALLOCATE ALL, DISCARD ALL) or portal (end of transaction) is gone."""

    def arm_copy_in(self, state: CryptoState | None) -> None:
        """A Query was accepted: arm COPY FROM STDIN if it copies into a protected table."""

    def disarm_copy_in(self) -> None:
        """The COPY an armed rewriter was waiting for never started."""

    def copy_in_data(self, body: bytes) -> bytes | None:
        """The client's CopyData while armed: the rewritten message, b"" to drop, None to forward."""

    def copy_in_end(self, done: bool) -> bytes | None:
        """The client's CopyDone (``done``) or CopyFail: what to send before or instead of it."""

    # -- backend ---------------------------------------------------------------------------------------
    def parameter_description(self, body: bytes, state: CryptoState) -> bytes | None:
        """ParameterDescription answering a statement Describe: the client's view of it."""

    def statement_row_description(self, body: bytes, state: CryptoState | None) -> bytes | None:
        """RowDescription answering a statement Describe."""

    def portal_row_description(self, body: bytes, state: CryptoState | None, formats: tuple[int, ...]) -> bytes | None:
        """RowDescription answering a portal Describe; ``formats`` are the portal's result formats."""

    def result_row_description(self, body: bytes, state: CryptoState | None) -> tuple[bytes | None, bool]:
        """RowDescription of a simple Query's result: (replacement, whether its rows are rewritten)."""

    def execute_rows(self, state: CryptoState) -> bool:
        """An Execute is the head of the queue: whether its rows are rewritten (their plan is made
        current)."""

    def data_rows_current(self, data: bytes, start: int, end: int, rows: int) -> bytes:
        """A run of ``rows`` complete DataRow messages ``data[start:end]`` of the current result."""

    def statement_done(self, state: CryptoState) -> None:
        """CommandComplete of one statement of a simple Query."""

    def copy_in_response(self, state: CryptoState | None, body: bytes) -> None:
        """CopyInResponse: make sure the client's rows will be rewritten. A ``ProxyError`` refuses the
        COPY."""

    def copy_out_response(self, state: CryptoState | None, body: bytes) -> bool:
        """CopyOutResponse: whether the server's rows are rewritten."""

    def copy_out_data(self, body: bytes) -> bytes:
        """The server's CopyData of a rewritten COPY TO STDOUT: the rewritten messages (or b"")."""

    def copy_out_done(self) -> bytes | None:
        """The server's CopyDone: what to send in its place (the rewriter's tail and CopyDone), if any."""
