"""Transparent encryption of protected columns: from analysis plans to rewritten protocol messages.

:class:`CryptoContext` is process-wide: the catalog of protected columns, their codecs and associated
data, a synchronous view of the key cache, and the analysis cache (by statement text, so a prepared or
repeated statement is analysed once). :class:`SessionCrypto` is per session: it turns one frontend or
backend message into its rewritten form and is called by the relay. Pure: no I/O. A key that is not in
memory raises :class:`KeyMiss`; the relay then suspends the stream and the session fetches the key.

What is rewritten (PostgreSQL docs, "Extended Query" and "Message Formats"):

* Query: literals bound for protected columns are replaced in place by ``'\\x…'::bytea`` literals of
  their ciphertext; the server otherwise sees the application's own SQL.
* Parse: parameters bound for protected columns are declared ``bytea``; ParameterDescription goes back
  to the client with the declared types.
* Bind: protected parameters are normalised to the type's canonical form from the client's text or
  binary value, sealed, and sent in binary; protected result columns are requested in binary. The
  Bind is rewritten in place (:class:`~proxy.protocol.messages.BindFrame`): only the sealed values and
  the format lists are new bytes, and what each parameter needs was worked out once, at Parse.
* RowDescription: protected columns show the declared type and the format the client asked for.
* DataRow: :func:`proxy.encrypt.rows.rewrite_data_row`.

A statement that cannot be handled safely is never forwarded. The relay sends the server a stand-in that
fails (so the server's own error handling, transaction state and pipeline semantics stay exact) and
replaces the server's error with the refusal built here (SQLSTATE 0A000 for constructs, the type's
SQLSTATE for a bad value), naming the column and the construct but never a value.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keymgmt.envelope import (
    NATIVE_SUBJECT_KEYS,
    DataKey,
    KeyState,
    Opener,
    OpenFailed,
    Subject,
    column_associated_data,
    peek_key_id,
    seal,
)
from proxy.audit import SessionAudit
from proxy.encrypt.bindseal import BindSealer, with_result_formats
from proxy.encrypt.casts import CastNotSupported, NumericOutOfRange, canonical_through_cast
from proxy.encrypt.keyring import KeyRing, KeyUnavailable
from proxy.encrypt.offload import TOO_LARGE, analyze_detached, read_detached
from proxy.encrypt.rows import (
    Action,
    ColumnOutput,
    Mask,
    RowDecryptError,
    RowPlan,
    rewrite_data_row,
    rewrite_data_rows,
    rewrite_value_text,
    run_key_ids,
    screen_output,
)
from proxy.encrypt.sqlnames import MAX_PARSED_TEXT, namespace_ops
from proxy.encrypt.subjectgen import (
    ColumnDefault,
    GeneratedPlan,
    check_column_default,
    default_values_query,
    highest_parameter,
    plan_generated_subjects,
    supply_subject_parameters,
    supply_subjects,
)
from proxy.encrypt.subjects import InvalidSubject, subject_from_binary, subject_from_text
from proxy.encrypt.visibility import (
    OUTCOMES,
    PLAINTEXT_VIEW,
    MaskKeyMissing,
    PolicyDenied,
    UniformView,
    action_for,
    decide,
    presents_declared_type,
    server_binary_for,
    writes_envelopes,
)
from proxy.errors import FeatureNotSupported, ProtocolViolation, ProxyError, RefusalReason
from proxy.pgtypes import codec_for
from proxy.pgtypes.base import SessionFormat, TypeCodec, python_codec, statement_bytes, statement_text, wire_text
from proxy.pgtypes.bytea import BYTEA
from proxy.pgtypes.text import TextCodec
from proxy.policy.masks import compile_mask
from proxy.policy.model import Grant, MaskFunction, ReferenceKind, RoleView, Visibility
from proxy.policy.model import Mask as PolicyMask
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.encryption import REFUSED_PORTAL_NAME as REFUSED_PORTAL_NAME
from proxy.protocol.encryption import REFUSED_QUERY as REFUSED_QUERY
from proxy.protocol.encryption import REFUSED_STATEMENT_NAME as REFUSED_STATEMENT_NAME
from proxy.protocol.encryption import (
    AnalysisMiss,
    CryptoState,
    KeyMiss,
    NamespaceAction,
    NamespaceOp,
    ValuesMiss,
    Version,
    refused_bind,
)
from proxy.protocol.encryption import Outcome as Outcome
from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, SubjectColumn
from proxy.rewrite.copyrows import CopyOptions, CopyRowRewriter
from proxy.rewrite.plan import (
    CopyDirection,
    CopyFormat,
    CopyPlan,
    HiddenOutput,
    LiteralTarget,
    QueryPlan,
    Refusal,
    StatementKind,
    StatementPlan,
    SubjectValue,
)
from proxy.rewrite.reading import reading_refusal, version_refusal
from proxy.rewrite.refusals import SubjectNotGiven

log = logging.getLogger(__name__)

BYTEA_OID = 17
# text, varchar, bpchar, json: canonical UTF-8 is the wire value in both formats for a UTF8 client.
_UTF8_AS_IS = frozenset({25, 1043, 1042, 114})
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_ENABLED = KeyState.ENABLED  # a module global: the hot path compares against it once per Bind and column
_EXECUTE_REFUSAL = (RefusalReason.CONSTRUCT, "0A000")  # what refused_execute answers
_MASKING = frozenset({Action.MASK, Action.DECODE_MASK})
_DECRYPTING = frozenset({Action.DECRYPT, Action.MASK})  # the actions that open an envelope
# Types whose values never hold an envelope's bytes or its text forms (fixed-width scalars, numeric):
# their unattributed result columns are not screened (see SessionCrypto._screens).
_UNSCREENED = frozenset(
    {16, 18, 20, 21, 23, 26, 27, 28, 29, 650, 700, 701, 790, 829, 869, 1082, 1083, 1114, 1184, 1186, 1266, 1700, 2950,
     3220}
    # and their arrays (pg_type.typarray): an element is as short as its type
    | {1000, 1002, 1016, 1005, 1007, 1028, 1010, 1011, 1012, 651, 1021, 1022, 791, 1040, 1041, 1182, 1183, 1115, 1185,
       1187, 1270, 1231, 2951, 3221}
)  # fmt: skip


def _plaintext_view() -> RoleView:
    return PLAINTEXT_VIEW


_HIDDEN_VIEW = UniformView(Grant(Visibility.HIDDEN))


# Statements up to this many characters are analysed on the event loop (about 2 ms at most); longer
# ones in the analysis worker process (proxy.encrypt.offload), up to the configured maximum.
INLINE_ANALYSIS_LIMIT = 8192
DEFAULT_MAX_ANALYZED_STATEMENT = 16777216
# The analysis cache holds at most this much statement text, however many entries that is.
_CACHE_CHARS = 64 * 1024 * 1024
# Results from the worker wait for their retry; a session that died first leaves one behind.
_DETACHED_LIMIT = 64
# The worker's verdict on a statement over the limit that may name a protected table (a plan, as a marker).
_TOO_LARGE = QueryPlan("")
_TOO_LARGE_TO_READ = ProxyError("too large to read")  # the same for the reading check


def refused_execute() -> tuple[bytes, bytes]:
    """(stand-in Execute, refusal) for rows whose protected columns cannot be located."""
    e = _unsupported(
        "the result of this statement has encrypted columns that only a Describe can locate",
        hint="Describe the statement or portal before Execute, or list the columns explicitly",
    )
    return codec.encode_frontend(refused_bind()), refusal_bytes(e)


class DecryptionError(ProxyError):
    """A stored value failed to decrypt; names table and column, never the value. ``partial`` holds the
    rewritten rows of the same batch that came before the failing one."""

    sqlstate = "XX001"
    partial = b""


@dataclass(frozen=True, slots=True)
class ColumnCrypto:
    column: ProtectedColumn
    codec: TypeCodec
    associated: bytes

    def output(
        self,
        *,
        server_binary: bool,
        client_binary: bool,
        fmt: SessionFormat,
        action: Action = Action.DECRYPT,
        mask: Mask | None = None,
    ) -> ColumnOutput:
        identity = self.codec.oid in _UTF8_AS_IS and python_codec(fmt.client_encoding) is None
        return ColumnOutput(
            self.column, self.codec, self.associated, server_binary, client_binary, identity, action, mask
        )


@dataclass(frozen=True, slots=True)
class ParamTarget:
    """One protected parameter of a prepared statement, resolved once when it is parsed."""

    index: int  # 0-based parameter number
    column: ColumnCrypto
    column_id: str
    associated: bytes
    client_oid: int  # the type the client declared in Parse (0 = unspecified)
    # The canonical form is the client's bytes when they are valid UTF-8 (text without a length limit;
    # in binary only if the client declared no other type).
    text_as_is: bool
    binary_as_is: bool
    key_slot: int  # parameters bound for the same column share a slot: one key lookup per Bind
    envelope: bool = False  # a ciphertext role binds the stored envelope: checked and passed on, not sealed
    subject: SubjectValue | None = None  # per-subject keys: where the row's subject comes from (then no slot)


# The keys a statement's literals were sealed under at Parse: (column, data subject, key id) each.
LiteralKeys = tuple[tuple[ColumnCrypto, Subject | None, bytes], ...]


@dataclass(frozen=True, slots=True)
class GeneratedParameters:
    """A prepared INSERT's generated subject ids: the client binds ``given`` parameters, pgveil ``rows``
    more (``$given+1`` …, text), the values of ``query`` (the column default, once per row) at each Bind."""

    given: int
    rows: int
    query: str
    # The table and what the catalog said of its subject column when the statement was prepared: a Bind
    # after a reload that says otherwise (a trigger, another default) is refused.
    table: str = ""
    subject_column: str = ""
    default: ColumnDefault | None = None


@dataclass(slots=True)
class StatementCrypto(CryptoState):
    """What the proxy knows about one prepared statement that touches protected columns."""

    plan: StatementPlan
    params: dict[int, ColumnCrypto]  # 0-based parameter index -> column
    client_param_types: tuple[int, ...]
    result_hint: tuple[ColumnCrypto | None, ...] | None
    # The login role's view the statement was decided under; a Bind under another epoch decides again.
    view: RoleView | None = None  # None: not decided under any view yet (the next Bind decides)
    # The columns its text asks the server for as NULL (hidden from the role when it was parsed).
    nulled: frozenset[ProtectedColumn] = frozenset()
    # The keys its literals were sealed under at Parse (column, data subject, key id): a Bind after a
    # rotation made another key current is refused, never stores an envelope under the old key.
    literal_keys: LiteralKeys = ()
    # An INSERT that leaves its rows' subject column to the database: pgveil binds the ids it obtains at
    # each Bind as parameters of its own, after the client's.
    generated: GeneratedParameters | None = None
    # Derived from the above once, so that each Bind and Execute only looks things up.
    targets: tuple[ParamTarget, ...] = field(init=False)
    key_slots: int = field(init=False)
    targets_in_order: bool = field(init=False)  # ascending parameter index, as a Bind lists values
    copies_in: bool = field(init=False)
    # The native Bind plan (proxy/encrypt/bindseal.py), derived from targets: not part of the state's identity.
    sealer: BindSealer | None = field(init=False, default=None, compare=False, repr=False)
    # The (table, subject column) pairs whose client-given ids its values are sealed for, derived likewise:
    # each Bind checks them against the catalog's triggers (CryptoContext.check_given_subject).
    given_subjects: tuple[tuple[str, SubjectColumn], ...] = field(init=False, default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        self.adopt(self.view)
        self.copies_in = _copies_in_protected(self.plan)

    def adopt(self, view: RoleView | None) -> None:
        """Takes ``view`` (decided for it already): what each parameter is bound as depends on it."""
        self.view = view
        slots: dict[str, int] = {}
        targets: list[ParamTarget] = []
        for i, cc in self.params.items():
            oid = self.client_param_types[i] if i < len(self.client_param_types) else 0
            as_is = isinstance(cc.codec, TextCodec) and cc.codec.max_chars < 0
            column_id = cc.column.column_id
            subject = self.plan.param_subjects.get(i + 1) if cc.column.subject_kind is not None else None
            slot = -1 if subject is not None else slots.setdefault(column_id, len(slots))
            binary_as_is = as_is and oid in (0, cc.codec.oid)
            envelope = view is not None and writes_envelopes(cc.column, view.grant(cc.column))
            targets.append(
                ParamTarget(i, cc, column_id, cc.associated, oid, as_is, binary_as_is, slot, envelope, subject)
            )
        self.targets = tuple(targets)
        self.key_slots = len(slots)
        self.targets_in_order = all(a.index < b.index for a, b in itertools.pairwise(targets))
        self.sealer = BindSealer.compile(self.targets)
        given = {(t.subject.table, t.subject.subject) for t in self.targets if t.subject is not None}
        given.update((t.subject.table, t.subject.subject) for t in self.plan.literal_targets if t.subject is not None)
        self.given_subjects = tuple(given)


@dataclass(slots=True)
class PortalCrypto(CryptoState):
    statement: StatementCrypto | None
    client_formats: tuple[int, ...]  # as the client sent them in Bind (compact form)
    server_formats: tuple[int, ...]  # as the proxy sent them to the server
    row_plan: RowPlan | None = None
    described: bool = False  # the client sent Describe for this portal (its RowDescription maps the rows)
    # The view its rows are served under (an Execute under another decides again); None: the current view
    # when its RowDescription arrives (a portal of a statement pgveil had nothing to decide for).
    view: RoleView | None = None

    def needs_description(self) -> bool:
        """Rows whose protected columns only a RowDescription can locate, and none was asked for."""
        st = self.statement
        return self.row_plan is None and not self.described and st is not None and st.plan.result_via_row_description


@dataclass(slots=True)
class QueryCrypto(CryptoState):
    """A simple Query's plan: one statement plan per statement, advanced per CommandComplete."""

    statements: tuple[StatementPlan, ...]
    index: int = 0
    view: RoleView | None = None  # the login role's view when the Query was sent (None: the current one)

    def current_hint(self, ctx: CryptoContext) -> tuple[ColumnCrypto | None, ...] | None:
        if self.index >= len(self.statements):
            return None
        return ctx.result_hint(self.statements[self.index])


def format_for(formats: Sequence[int], i: int) -> int:
    """The protocol's compact format-code rule: none = text, one = all, else one per column."""
    if not formats:
        return 0
    if len(formats) == 1:
        return formats[0]
    return formats[i] if i < len(formats) else 0


def refusal_bytes(e: ProxyError) -> bytes:
    return codec.encode_error("ERROR", e.sqlstate, e.message, detail=e.detail, hint=e.hint)


class CryptoContext:
    """Process-wide encryption state; shared by every session. See the module docstring."""

    def __init__(
        self,
        catalog: Catalog,
        keys: KeyRing,
        *,
        cache_size: int = 10000,
        max_analyzed_statement: int = DEFAULT_MAX_ANALYZED_STATEMENT,
        inline_analysis_limit: int = INLINE_ANALYSIS_LIMIT,
    ) -> None:
        self.keys = keys
        self._cache: OrderedDict[str, QueryPlan] = OrderedDict()
        self.stale_names: dict[str, int] = {}
        self._cache_size = cache_size
        self._cache_chars = 0  # statement text held by the cache, bounded by _CACHE_CHARS
        self.max_analyzed_statement = max_analyzed_statement
        self.inline_analysis_limit = inline_analysis_limit
        # Plans analysed off the event loop, waiting for their held message to be retried.
        self._detached: dict[str, QueryPlan] = {}  # or _TOO_LARGE
        self._read: dict[tuple[str, bool, str, bool], ProxyError | None] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self._maskers: dict[tuple[str, str, str, bytes | None], Mask] = {}
        self._shared_opener: tuple[tuple[int, int], Opener] | None = None
        # Why protected tables cannot be served right now (catalog or keys not loaded), or None.
        self.unavailable: str | None = None
        self.install(catalog)

    def install(
        self, catalog: Catalog, epoch: int | None = None, subject_defaults: Mapping[str, ColumnDefault] | None = None
    ) -> None:
        """Adopts a catalog (with OIDs and attribute numbers once read from the server).

        Every member of a protected table's family (partition, inheritance child, view) maps its own
        (OID, attribute number) to the root's column, so a RowDescription from any of them is
        decrypted with the root's identity. ``epoch`` is :attr:`reload_epoch` when the reload that read
        ``catalog`` started: it is fresh for every request made before that, and stale still for the
        requests made while it was being read (another reload follows)."""
        self.catalog = catalog
        # What each table with per-subject keys stores in its subject column when an INSERT leaves it out
        # (by qualified name; read with the catalog, see catalog_loader.read_subject_defaults).
        self.subject_defaults: Mapping[str, ColumnDefault] = dict(subject_defaults or {})
        # Every table (and member of a family) whose root has a BEFORE INSERT or UPDATE row trigger that
        # could change a client-given subject id, by qualified name, to its root's (check_given_subject).
        self._trigger_guarded: dict[str, str] = {
            name: name for name, default in self.subject_defaults.items() if default.before_write_trigger
        }
        for t in catalog.tables.values():
            root = t.root if t.root is not None else t.qualified_name
            default = self.subject_defaults.get(root)
            if default is not None and default.before_write_trigger:
                self._trigger_guarded[t.qualified_name] = root
        self._cache.clear()
        self._cache_chars = 0
        self._detached.clear()
        self._read.clear()
        self.columns: dict[str, ColumnCrypto] = {}
        self.by_attr: dict[tuple[int, int], ColumnCrypto] = {}
        self.attnums: dict[int, frozenset[int]] = {}  # every live attribute of each protected relation
        # Per-subject keys: each relation's subject column (attribute number, subject, name), by OID.
        self.subject_attrs: dict[int, tuple[int, SubjectColumn, str]] = {}
        for table in catalog.tables.values():
            if table.oid and table.attnums:
                self.attnums[table.oid] = frozenset(table.attnums)
                s = table.subject
                if s is not None and s.column in table.all_columns:
                    attnum = table.attnums[table.all_columns.index(s.column)]
                    self.subject_attrs[table.oid] = (attnum, s, table.qualified_name)
            for col in table.columns.values():
                cc = ColumnCrypto(col, codec_for(col.declared_type), column_associated_data(col.column_id))
                if table.root is None or col.column_id not in self.columns:
                    self.columns[col.column_id] = cc  # the configured table's own column wins
                if col.table_oid and col.attnum:
                    self.by_attr[(col.table_oid, col.attnum)] = cc
        self.unavailable = None
        if epoch is None:
            epoch = self.reload_epoch
        if self._stale_since <= epoch:
            self.stale = False
        self.stale_names = {n: e for n, e in self.stale_names.items() if e > epoch}

    # -- catalog freshness -----------------------------------------------------------------------------
    # DDL through pgveil (seen by the session that sends it), DDL elsewhere (the event trigger's
    # notification, heard by the runtime) and a RowDescription that disagrees with the catalog all call
    # request_reload. Until the runtime installs a catalog whose reading started after the request,
    # ``stale`` holds and statements on protected tables are refused with 55000; so are statements naming
    # one of ``stale_names`` (each remembered with the epoch of its request, so that a stream of
    # requests never keeps an older name refused beyond the next reload).
    stale: bool = False
    stale_names: dict[str, int]
    reload_epoch: int = 0
    _stale_since: int = 0  # the epoch of the last request that marked the whole catalog stale
    on_reload: Callable[[], None] | None = None  # set by the runtime: schedules a (coalesced) reload

    def request_reload(self, names: Iterable[str] = ()) -> None:
        """The catalog may be behind the database (DDL through pgveil, a RowDescription that disagrees)."""
        self.stale = True
        self._stale_since = self._mark(names)

    def suspect(self, names: Iterable[str]) -> None:
        """Relations that DDL elsewhere may have changed (the event trigger's hint): statements naming
        them wait for the reload; the rest of the catalog is not marked stale (a hint has no authority,
        and any role may send one)."""
        self._mark(names)

    def _mark(self, names: Iterable[str]) -> int:
        self.reload_epoch += 1
        for name in names:
            if len(self.stale_names) >= _MAX_STALE_NAMES and name not in self.stale_names:
                self.stale = True  # too many to remember: everything waits for the next reload (fail closed)
                self._stale_since = self.reload_epoch
                break
            self.stale_names[name] = self.reload_epoch
        if self.on_reload is not None:
            self.on_reload()
        return self.reload_epoch

    def analyze(self, sql: str, *, keep: bool = True) -> QueryPlan:
        """The plan of ``sql``, cached (``keep=False``: a text that is not sent twice, such as an INSERT with
        generated ids, is analysed without displacing the cache's entries)."""
        key = sql
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return cached
        plan = self._detached.pop(key, None)
        if plan is None:
            if len(sql) > self.inline_analysis_limit and not self.catalog.empty:
                # Even the check whether the text names a protected table reads all of it, once per
                # table: a long statement goes to the worker whole.
                args = (sql, self.catalog, self.max_analyzed_statement)
                raise AnalysisMiss(analyze_detached, args, self._deliver(key))
            self.cache_misses += 1
            plan = analyze(sql, self.catalog)
        elif plan is _TOO_LARGE:
            self.check_size(sql)
        else:
            self.cache_misses += 1
        if not keep:
            return plan
        self._cache[key] = plan
        self._cache_chars += len(sql)
        while len(self._cache) > self._cache_size or self._cache_chars > _CACHE_CHARS:
            old_sql, _plan = self._cache.popitem(last=False)
            self._cache_chars -= len(old_sql)
        return plan

    def check_size(self, sql: str) -> None:
        """StatementTooLarge for a statement longer than pgveil analyses."""
        if len(sql) > self.max_analyzed_statement:
            raise StatementTooLarge(
                f"pgveil: the statement is {len(sql)} characters long, more than the"
                f" {self.max_analyzed_statement} pgveil analyses; it is refused because it may name a table"
                " with encrypted columns",
                hint="sessions.max_analyzed_statement_size sets the limit",
            )

    def detached_reading(self, args: tuple[str, bool, str, bool]) -> ProxyError | None:
        """The reading check of a long statement, from the analysis worker (AnalysisMiss until it is in)."""
        if args in self._read:
            refusal = self._read[args]  # kept: the retry may be held again, for the analysis
            if refusal is _TOO_LARGE_TO_READ:
                self.check_size(args[0])
            return refusal

        def deliver(result: object) -> None:
            refusal: ProxyError | None
            if isinstance(result, tuple) and len(result) == 2 and result[0] == "read":
                refusal = result[1]
            elif isinstance(result, tuple) and len(result) == 2 and result[0] == TOO_LARGE:
                refusal = _TOO_LARGE_TO_READ
            else:
                log.error("reading check off the event loop failed (%s); statement refused", type(result).__name__)
                refusal = FeatureNotSupported(
                    "pgveil: the statement could not be checked; it is refused while tables have encrypted columns"
                )
            if len(self._read) >= _DETACHED_LIMIT:
                self._read.clear()
            self._read[args] = refusal

        raise AnalysisMiss(read_detached, (*args, self.max_analyzed_statement), deliver)

    def _deliver(self, key: str) -> Callable[[object], None]:
        """Where the worker's result goes: kept for the retried message, if the catalog is still the one
        it was analysed with (else the retry analyses again)."""
        catalog = self.catalog

        def deliver(result: object) -> None:
            if self.catalog is not catalog:
                return
            if result == TOO_LARGE:
                result = _TOO_LARGE
            elif not isinstance(result, QueryPlan):
                log.error("SQL analysis off the event loop failed (%s); statement refused", type(result).__name__)
                refusal = Refusal(
                    "pgveil: the statement could not be analysed; it is refused because it names a table with"
                    " encrypted columns"
                )
                result = QueryPlan(key, (StatementPlan(StatementKind.OTHER, True, refusal),), True)
            if len(self._detached) >= _DETACHED_LIMIT:
                self._detached.clear()  # sessions that died before their retry; bounded memory
            self._detached[key] = result

        return deliver

    def column(self, col: ProtectedColumn) -> ColumnCrypto:
        # By attribute first: two columns of one table may share an identity (a column being migrated
        # and its shadow, see proxy/catalog_loader.py) and differ in whether they are encrypted.
        found = self.by_attr.get((col.table_oid, col.attnum)) if col.attnum else None
        return found if found is not None else self.columns[col.column_id]

    def result_hint(self, plan: StatementPlan) -> tuple[ColumnCrypto | None, ...] | None:
        if plan.result_columns is None:
            return None
        return tuple(None if c is None else self.column(c) for c in plan.result_columns)

    def key_lookup(self, key_id: bytes) -> DataKey | None:
        return self.keys.by_id(key_id)

    def shared_opener(self) -> Opener:
        """An Opener shared by the results of every session while its validity token holds: the key
        cache's generation (every invalidation, refresh and flush changes it, so a key disabled, destroyed
        or rotated away is never used by a later result) and the current second (so no key is used much
        past its cache TTL). A result of a thousand subjects' keys then finds them in the Opener, not one
        keystore-cache lookup per key per result."""
        generation = getattr(getattr(self.keys.source, "cache", None), "generation", None)
        if not isinstance(generation, int):
            return Opener(self.key_lookup)  # a key source without a generation: one Opener per result
        token = (generation, int(time.monotonic()))
        shared = self._shared_opener
        if shared is None or shared[0] != token:
            shared = self._shared_opener = (token, Opener(self.key_lookup))
        return shared[1]

    def write_key(self, column_id: str) -> DataKey:
        """The column's current key for sealing: KeyMiss to fetch it, KeyUnavailable if it is not enabled."""
        key = self.keys.active(column_id)
        if key.state is not _ENABLED:
            raise KeyUnavailable(f"pgveil: the data key of column {column_id} is not enabled")
        return key

    def subject_write_key(self, subject: Subject, column_id: str) -> DataKey:
        """The data subject's current key for sealing a value of ``column_id`` (see :meth:`write_key`)."""
        key = self.keys.subject(subject, column_id)
        if key.state is not _ENABLED:
            raise KeyUnavailable(f"pgveil: the data key of a data subject of column {column_id} is not enabled")
        return key

    def seal(self, cc: ColumnCrypto, canonical: bytes, subject: Subject | None = None) -> bytes:
        """Seals a value of ``cc``: under its row's data subject's key for a column with per-subject keys
        (``subject`` is then required: never a fallback to a column's key), else the column's key."""
        if cc.column.subject_kind is not None:
            if subject is None or subject.kind != cc.column.subject_kind:
                raise _unsupported(f"no data subject for a value of column {cc.column.column_id}")
            return seal(self.subject_write_key(subject, cc.column.column_id), canonical, cc.associated)
        return seal(self.write_key(cc.column.column_id), canonical, cc.associated)

    def check_given_subject(self, table: str, subject: SubjectColumn) -> None:
        """Refuses (0A000) to seal values for a client-given subject id of ``table`` (or of its root) when a
        BEFORE INSERT or UPDATE row trigger on it or a descendant could change the id afterwards: the
        values would be sealed under another subject's key than the row's, and shredding the row's
        subject would not destroy them."""
        root = self._trigger_guarded.get(table)
        if root is not None:
            raise _unsupported(
                f"cannot seal the encrypted columns of {table} for the subject given in {subject.column}: "
                f"a BEFORE INSERT or UPDATE trigger on {root} or its partitions may change it",
                hint="drop the trigger, or have it leave the subject column unchanged and move it to AFTER",
            )

    def check_envelope(
        self,
        cc: ColumnCrypto,
        envelope: bytes,
        lookup: Callable[[bytes], DataKey | None],
        subject: Subject | None = None,
    ) -> None:
        """A value a ciphertext role writes into an encrypted column must be an envelope of that column:
        it is opened with the column's associated data (and its plaintext dropped), else refused. Never
        stores a non-envelope, never one moved from another column (or, with per-subject keys, from
        another subject's row: its key must be ``subject``'s)."""
        subject_keyed = cc.column.subject_kind is not None
        try:
            Opener(lookup, python=subject_keyed and not NATIVE_SUBJECT_KEYS).open(
                envelope, 0, len(envelope), cc.associated
            )
        except OpenFailed as e:
            raise _NotAnEnvelope(
                f"pgveil: the value for column {cc.column.column_id} is not a valid envelope of that column "
                f"({e.reason.value})",
                hint="a role that sees the column as ciphertext writes the stored envelopes it read",
            ) from None
        if subject_keyed:
            key = lookup(envelope[4:20])
            if key is None or key.data_subject != subject:
                raise _NotAnEnvelope(
                    f"pgveil: the value for column {cc.column.column_id} is an envelope of another data subject "
                    "than its row's",
                    hint="a role that sees the column as ciphertext writes the stored envelopes it read",
                )

    def masker(self, cc: ColumnCrypto, mask: PolicyMask) -> Mask:
        """The compiled mask of ``mask`` on the column (cached). ``hash`` takes its key from the key ring
        (KeyMiss to fetch it; MaskKeyMissing when no keystore is configured)."""
        hash_key: bytes | None = None
        if mask.function is MaskFunction.HASH:
            if self.keys.source is None:
                raise _mask_key_missing(cc.column)
            hash_key = self.keys.mask_key()
        key = (cc.column.column_id, cc.column.declared_type, str(mask), hash_key)
        compiled = self._maskers.get(key)
        if compiled is None:
            if len(self._maskers) > 4096:
                self._maskers.clear()
            compiled = self._maskers[key] = compile_mask(
                mask, cc.column.declared_type, hash_key, cc.column.column_id.encode("utf-8")
            )
        return compiled


class SessionCrypto:
    """Per-session rewriting; the relay calls one method per message it acts on."""

    def __init__(self, ctx: CryptoContext, login_role: str, view: Callable[[], RoleView] | None = None) -> None:
        """``view`` returns the login role's current view of the governed columns (the runtime's policy
        and membership; it may raise a ProxyError while they are not loaded). Without it, every governed
        column is plaintext: the behaviour before visibility policies, for tests and tools only."""
        self.ctx = ctx
        self.login_role = login_role
        self._view_source: Callable[[], RoleView] = view if view is not None else _plaintext_view
        self.fmt = SessionFormat()
        self._utf8_client = _is_utf8(self.fmt)
        # DDL on protected relations sent in this session's open transaction: the service connection
        # cannot see it until it commits, so this session's statements on them wait for its end.
        self._ddl_open = False
        self._ddl_names: set[str] = set()
        self.values_encrypted = 0
        self.values_decrypted = 0
        self.decrypt_failures = 0
        self.refused: dict[tuple[RefusalReason, str], int] = {}  # (reason, SQLSTATE) -> count, for the metrics
        # Values of governed columns served, by (the view's metric label, outcome: plaintext, masked, hidden,
        # ciphertext); counted per result column and row, NULLs included, as values_decrypted.
        self.values_served: dict[tuple[str, str], int] = {}
        # The same by (label, column_id, outcome), for the access audit (proxy.audit), which drains it.
        self.values_read: dict[tuple[str, str, str], int] = {}
        self.audit: SessionAudit | None = None  # the access audit's seam (refusals, counts), if enabled
        self._memo_served: tuple[tuple[tuple[str, str, str], int], ...] = ()
        # id(row plan) -> (the plan, what each of its rows serves by (label, column_id, outcome))
        self._plan_served: dict[int, tuple[RowPlan, tuple[tuple[tuple[str, str, str], int], ...]]] = {}
        self._memo_plan: RowPlan | None = None
        self._memo: dict[bytes, Any] = {}
        self._memo_count = 0
        # What the relay keeps this object for (see proxy.protocol.encryption.SessionEncryption).
        self.in_flight = False
        self.copy_in_armed = False
        self._stmt_crypto: dict[str, StatementCrypto] = {}
        self._portal_crypto: dict[str, PortalCrypto] = {}
        self._row_plan: RowPlan | None = None  # the result whose DataRows the relay hands over now
        self._copy_out_rw: CopyRowRewriter | None = None  # rewrites the server's COPY TO STDOUT rows
        self._described_cache: dict[bytes, tuple[ColumnCrypto | None, ...] | None] = {}  # see _described
        self._described_catalog: Catalog | None = None
        self._screening: tuple[RoleView, Catalog, bool] | None = None  # see _screens
        # SQL PREPAREd statements on governed columns: name -> (the statements decided, the epoch)
        self._sql_prepared: dict[str, tuple[tuple[StatementPlan, ...], int]] = {}
        self._copy_out_served: tuple[tuple[tuple[str, str, str], int], ...] = ()  # per row of the COPY TO
        self._copy_out_counting = False  # a COPY TO whose rows pass unchanged but are counted
        self._copy_out_rows = 0
        # Rewrites the client's COPY FROM STDIN rows. It lives until the client's CopyDone/CopyFail, not
        # the server's reply: a client keeps sending (plaintext) rows after the server gave up, and they
        # must still be encrypted or dropped, never passed on.
        self._copy_in_rw: CopyRowRewriter | None = None
        self._copy_in_failed = False
        # Generated subject ids obtained for the message being retried: (what they are for, the ids). Kept
        # while the retry raises KeyMiss or AnalysisMiss (a new subject's key is fetched next), dropped
        # once the message is handled.
        self._generated: tuple[object, list[str]] | None = None

    # -- the login role's view -------------------------------------------------------------------------
    def current_view(self) -> RoleView:
        """The view statements are decided under now (a ProxyError while it cannot be known)."""
        return self._view_source()

    def _policy(self, statements: Iterable[StatementPlan], view: RoleView) -> ProxyError | None:
        """The per-statement decision under ``view``: the first refusal, or None. Also makes sure the
        hash mask's key is at hand for every column the statement outputs with it (KeyMiss now, before
        the server runs anything)."""
        for st in statements:
            references = st.references
            refused = decide(references, view)
            if refused is not None:
                return refused
            cp = st.copy
            if cp is not None and cp.direction is CopyDirection.TO and cp.format is CopyFormat.BINARY:
                for col in _governed_columns(cp):
                    if col is not None and view.grant(col).visibility is not Visibility.PLAINTEXT:
                        return PolicyDenied(
                            f"pgveil: permission denied for column {col.column_id}: binary COPY TO needs "
                            f"plaintext access (role {view.login_role or view.label} does not have it)",
                            hint="use COPY in text or CSV format",
                        )
            outputs = [r.column for r in references if r.kind is ReferenceKind.OUTPUT]
            outputs.extend(c for c in st.result_columns or () if c is not None)
            outputs.extend(c for c in st.cursor_columns or () if c is not None)
            if cp is not None and cp.direction is CopyDirection.TO:
                outputs.extend(c for c in _governed_columns(cp) if c is not None)
            if self.audit is not None:
                refused = self.audit.refusal(view, outputs)  # an access-audit anomaly rule (53400)
                if refused is not None:
                    return refused
            for col in outputs:
                mask = view.grant(col).mask
                if mask is not None and mask.function is MaskFunction.HASH:
                    if self.ctx.keys.source is None:
                        return _mask_key_missing(col)
                    self.ctx.keys.mask_key()
        return None

    def _fallback_view(self) -> RoleView:
        """The view for a result no decision was made for (a statement pgveil found harmless whose
        RowDescription shows governed columns): the current one, or everything hidden while it cannot be
        known."""
        try:
            return self._view_source()
        except ProxyError:
            return _HIDDEN_VIEW

    def _decided_view(self, statements: Iterable[StatementPlan]) -> tuple[RoleView | None, ProxyError | None]:
        """(the current view, None) if the statements may run under it, else (None, the refusal)."""
        try:
            view = self._view_source()
        except ProxyError as e:
            return None, e
        refused = self._policy(statements, view)
        return (None, refused) if refused is not None else (view, None)

    def _output(
        self, cc: ColumnCrypto, grant: Grant, *, client_binary: bool, server_binary: bool | None = None
    ) -> ColumnOutput:
        """The row plan entry of a result column carrying ``cc``'s values, for a role with ``grant``;
        ``server_binary`` is the format the server sends it in, when its RowDescription says so."""
        column = cc.column
        if grant.visibility is Visibility.DENY:
            # The decision refuses every statement that references a denied column; a result column
            # found only now (its RowDescription) must not be served either.
            raise PolicyDenied(f"pgveil: permission denied for column {column.column_id}: it is denied to this role")
        action = action_for(column, grant)
        mask: Mask | None = None
        if action in _MASKING:
            if grant.mask is None:
                action = Action.NULL  # a masked grant always names its mask; without one nothing is shown
            else:
                mask = self.ctx.masker(cc, grant.mask)
        if server_binary is None:
            server_binary = server_binary_for(column, action, client_binary)
        elif action is Action.STORED and server_binary != client_binary:
            # Only a Bind pgveil did not rewrite asks for another format than the client's; bytes that
            # go on as stored cannot change format.
            raise _unsupported(
                f"the result column of {column.column_id} arrives in another format than the client asked for"
            )
        return cc.output(
            server_binary=server_binary, client_binary=client_binary, fmt=self.fmt, action=action, mask=mask
        )

    def refusal(self, e: ProxyError) -> bytes:
        """The ErrorResponse that answers a refused message, counted for the metrics."""
        key = (e.reason, e.sqlstate)
        self.refused[key] = self.refused.get(key, 0) + 1
        log.info("refused: %s", e.message, extra={"event": "refusal", "sqlstate": e.sqlstate, "reason": e.reason.value})
        return refusal_bytes(e)

    def set_parameter(self, name: str, value: str) -> None:
        self.fmt = self.fmt.with_parameter(name, value)
        self._utf8_client = _is_utf8(self.fmt)

    def _reading_refusal(self, sql: str) -> ProxyError | None:
        """Whether the server reads ``sql`` as pgveil does (proxy.rewrite.reading), checked whenever tables
        are protected. Its lexer is Python: a long statement is checked in the analysis worker process
        (AnalysisMiss), one over the analysis limit refused (StatementTooLarge)."""
        ctx = self.ctx
        if ctx.catalog.empty:
            return None
        args = (sql, self.fmt.standard_conforming_strings, self.fmt.client_encoding, not self.in_flight)
        if len(sql) <= ctx.inline_analysis_limit:
            return reading_refusal(sql, standard_conforming_strings=args[1], client_encoding=args[2], certain=args[3])
        return ctx.detached_reading(args)

    # -- simple Query ----------------------------------------------------------------------------------
    def query(self, sql: str, *, generated: bool = False) -> Outcome:
        """``generated``: ``sql`` is pgveil's rewrite of the client's INSERT with generated subject ids."""
        try:
            unreadable = self._reading_refusal(sql)
            if unreadable is not None:
                return self._refuse(unreadable)
            plan = self.ctx.analyze(statement_text(sql, self.fmt), keep=not generated)
        except StatementTooLarge as e:
            return self._refuse(e)
        if plan.syntax_since > self.fmt.server_major:
            return self._refuse(version_refusal(self.fmt.server_major))
        refused: ProxyError | None = self._stale(sql, plan)
        if refused is None and not plan.touches_protected:
            return Outcome()
        refused = refused or plan.refusal or self._not_ready()
        if refused is None:
            self._note_ddl(plan)
        if refused is None and any(_copies_in_protected(st) for st in plan.statements):
            # The client's rows are rewritten from the moment the Query is sent (see arm_copy_in), before
            # the server says which COPY it is reading for; with a second COPY in the same string the
            # rewriter could be applied to the other table's rows.
            copies = sum(1 for st in plan.statements if st.kind is StatementKind.COPY)
            if copies > 1:
                refused = _unsupported(
                    "a query string that copies into a protected table may contain no other COPY statement",
                    hint="send each COPY as a query of its own",
                )
        if isinstance(refused, SubjectNotGiven) and not generated:
            return self._query_generated(sql, refused)
        if refused is not None:
            return self._refuse(refused)
        view, refused = self._decided_view(plan.statements)
        if view is None:
            assert refused is not None
            return self._refuse(refused)
        try:
            new_sql, _keys = self._encrypt_literals(plan, view)
        except ProxyError as e:
            return self._refuse(e)
        replacement = None if new_sql is None else codec.encode_frontend(m.Query(wire_text(new_sql, self.fmt)))
        self._note_sql_prepare(sql, plan.statements, view)
        return Outcome(replacement, QueryCrypto(plan.statements, view=view))

    # -- generated subject ids (proxy/encrypt/subjectgen.py) ----------------------------------------------
    def _generation(self, text: str, refused: SubjectNotGiven) -> tuple[GeneratedPlan, ColumnDefault]:
        """The plan for obtaining the ids an INSERT leaves to the database, or the refusal (the statement's
        own, or subjectgen's naming why pgveil cannot supply them)."""
        default = self.ctx.subject_defaults.get(refused.table)
        if default is None:
            raise refused
        plan = plan_generated_subjects(text, refused.table, refused.subject_column, default)
        if plan is None or default.expression is None:
            raise refused
        return plan, default

    def _generated_ids(self, purpose: object, query: str, rows: int) -> list[str]:
        """The ids obtained for ``purpose`` (the message being retried), or ValuesMiss: the relay runs
        ``query`` on the server first."""
        got = self._generated
        if got is not None and got[0] == purpose:
            return got[1]
        self._generated = None

        def deliver(ids: list[str]) -> None:
            self._generated = (purpose, ids)

        # In the protocol codec's form, as the client's own statements: the catalog's expression may hold
        # non-ASCII text, which the server reads in the client_encoding.
        raise ValuesMiss(wire_text(query, self.fmt), rows, deliver)

    def _query_generated(self, sql: str, refused: SubjectNotGiven) -> Outcome:
        """A simple-Query INSERT that leaves its rows' subject ids to the database: the ids are obtained on
        the server first (ValuesMiss), written into the statement, and the statement is then handled as
        if the client had written them (RETURNING shows them, each row is sealed for its subject)."""
        text = statement_text(sql, self.fmt)
        try:
            plan, default = self._generation(text, refused)
        except ProxyError as e:
            return self._refuse(e)
        assert default.expression is not None
        ids = self._generated_ids(("Q", sql), default_values_query(default.expression, plan.rows), plan.rows)
        # The server sent them in the client_encoding (the protocol codec's form): read as the statement is.
        ids = [statement_text(i, self.fmt) for i in ids]
        try:
            new_sql = wire_text(
                supply_subjects(text, refused.table, refused.subject_column, plan, ids, default.identity), self.fmt
            )
        except ProxyError as e:
            self._generated = None
            return self._refuse(e)
        out = self.query(new_sql, generated=True)  # KeyMiss / AnalysisMiss: the ids stay for the retry
        self._generated = None
        if out.replacement is None:
            out = Outcome(codec.encode_frontend(m.Query(new_sql)), out.state, out.refusal)
        return out

    def _note_sql_prepare(self, sql: str, statements: tuple[StatementPlan, ...], view: RoleView) -> None:
        """An SQL ``PREPARE`` in a text on governed columns: remembered with the statements it was
        decided for and the epoch, so that an ``EXECUTE`` of it after a policy change is decided again
        (the relay keeps no crypto state for SQL-level statements)."""
        if "prepare" not in sql.lower():
            return
        prepared = self._sql_prepared
        for op in namespace_ops(sql):
            if op.action is NamespaceAction.PREPARE:
                if len(prepared) > 1000 and op.name not in prepared:
                    prepared.clear()
                prepared[op.name] = (statements, view.epoch)

    def _encrypt_literals(self, plan: QueryPlan, view: RoleView) -> tuple[str | None, LiteralKeys]:
        """The statement text with every literal bound for a protected column sealed, or None if the
        text needs no change. A ciphertext role's literals are envelopes: checked, and passed on. A
        column the role sees hidden is asked for as NULL where the statement's own SELECT list names it
        (see HiddenOutput): the server does not send envelopes pgveil would drop."""
        hidden = [h.edit() for st in plan.statements for h in hidden_for(st, view)]
        if not plan.needs_rewrite and not hidden:
            return None, ()
        keys: list[tuple[ColumnCrypto, Subject | None, bytes]] = []
        # The analysis reads string literals as standard_conforming_strings = on does; query/parse have
        # already refused every text that the server would read otherwise (proxy/rewrite/reading.py).
        ciphertexts: dict[LiteralTarget, bytes] = {}
        for t in plan.literal_targets:
            cc = self.ctx.column(t.column)
            literal = statement_bytes(t.plaintext, self.fmt)
            subject = None
            if t.subject is not None and t.subject.literal is None:
                # Literals are sealed when the statement is prepared, before a parameter has a value.
                raise _unsupported(
                    f"a literal for encrypted column {cc.column.column_id} is in a row whose data subject is "
                    f"parameter ${t.subject.param}, which has no value when the statement is prepared",
                    hint="bind the value as a parameter too",
                )
            if t.subject is not None and t.subject.literal is not None:
                self.ctx.check_given_subject(t.subject.table, t.subject.subject)
                given = statement_bytes(t.subject.literal, self.fmt)
                given = self._client_subject(t.subject.table, t.subject.subject, given)
                subject = subject_from_text(t.subject.table, t.subject.subject, given)
            if writes_envelopes(cc.column, view.grant(cc.column)):
                if t.cast_type not in (None, "bytea") or t.numeric:
                    raise _NotAnEnvelope(
                        f"pgveil: the value for column {cc.column.column_id} must be a bytea envelope "
                        "(this role writes the column as ciphertext)"
                    )
                envelope = self._bytea_value(cc, literal)
                self.ctx.check_envelope(cc, envelope, self.ctx.key_lookup, subject)
                ciphertexts[t] = envelope
                continue
            if t.cast_type is not None:
                try:
                    canonical = canonical_through_cast(
                        cc.codec, t.cast_type, literal, self.fmt, cc.column.column_id, numeric_literal=t.numeric
                    )
                except ProxyError as e:
                    if isinstance(e, CastNotSupported | NumericOutOfRange):
                        raise
                    raise type(e)(f"{e.message} (column {cc.column.column_id})", detail=e.detail, hint=e.hint) from None
            else:
                canonical = self._canonical_text(cc, literal)
            ciphertexts[t] = envelope = self.ctx.seal(cc, canonical, subject)
            keys.append((cc, subject, bytes(peek_key_id(envelope))))
            self.values_encrypted += 1
        return plan.rewritten_sql(ciphertexts, hidden), tuple(keys)

    def _bytea_value(self, cc: ColumnCrypto, text: bytes) -> bytes:
        """The bytes of a bytea value in text form (``\\x…`` or escape format)."""
        try:
            return BYTEA.canonical_from_text(text, self.fmt)
        except ProxyError:
            raise _NotAnEnvelope(
                f"pgveil: the value for column {cc.column.column_id} is not a bytea value "
                "(this role writes the column as ciphertext)"
            ) from None

    def _canonical_text(self, cc: ColumnCrypto, data: bytes) -> bytes:
        try:
            return cc.codec.canonical_from_text(data, self.fmt)
        except ProxyError as e:
            raise type(e)(f"{e.message} (column {cc.column.column_id})", detail=e.detail, hint=e.hint) from None

    def _canonical_binary(self, cc: ColumnCrypto, data: bytes, client_oid: int) -> bytes:
        try:
            if client_oid in (0, cc.codec.oid) or (client_oid == BYTEA_OID and cc.codec.oid == BYTEA_OID):
                return cc.codec.canonical_from_binary(data, self.fmt)
            # The client declared another type and sent its binary form: convert through its text form.
            other = _codec_by_oid(client_oid)
            if other is None:
                raise _BadParameterType(
                    f"pgveil: a binary parameter of type OID {client_oid} cannot be stored in "
                    f"column {cc.column.column_id} (declared {cc.codec.name})"
                )
            text = other.to_text(other.canonical_from_binary(data, self.fmt), self.fmt)
            return cc.codec.canonical_from_text(text, self.fmt)
        except _BadParameterType:
            raise
        except ProxyError as e:
            raise type(e)(f"{e.message} (column {cc.column.column_id})", detail=e.detail, hint=e.hint) from None

    def _not_ready(self) -> ProxyError | None:
        if self.ctx.unavailable is None:
            return None
        e = ProxyError(
            self.ctx.unavailable,
            hint="statements on protected tables are refused until it is ready",
            reason=RefusalReason.NOT_READY,
        )
        e.sqlstate = "55000"
        return e

    # -- DDL and the catalog ---------------------------------------------------------------------------
    def _stale(self, sql: str, plan: QueryPlan) -> ProxyError | None:
        """55000 for a statement that uses protected relations (DDL excepted: the server applies it to
        ciphertext) while the catalog may be behind, or while this session's own open transaction has
        changed them; also for one naming a relation that DDL may just have made protected (a renamed
        table, a new partition, child or view). Statements after such DDL in the same text are refused by
        the analysis."""
        ctx = self.ctx
        if not (ctx.stale or self._ddl_open or ctx.stale_names):
            return None
        uses = [st for st in plan.statements if st.kind is not StatementKind.DDL]
        if plan.statements and not uses:
            return None
        if (ctx.stale or self._ddl_open) and any(st.touches_protected for st in uses):
            if self._ddl_open:
                return _stale_error(
                    "this transaction changed tables with encrypted columns; statements on them are refused "
                    "until it ends",
                    "commit (or roll back) the DDL first",
                )
            return _stale_error("the catalog of encrypted tables is being read again after DDL", "retry the statement")
        names = ctx.stale_names.keys() | self._ddl_names
        if names:
            lowered = sql.lower()
            if any(_names_identifier(lowered, n) for n in names):
                return _stale_error(
                    "the statement may name a table that DDL just changed; pgveil is reading its catalog again",
                    "retry the statement",
                )
        return None

    def _note_ddl(self, plan: QueryPlan) -> None:
        for st in plan.statements:
            if st.catalog_names:
                self._ddl_open = True
                self._ddl_names.update(st.catalog_names)

    def server_error(self, fields: tuple[tuple[bytes, str], ...]) -> tuple[tuple[bytes, str], ...] | None:
        """An integrity constraint error (class 23) names its table, and its DETAIL repeats values of the
        row (``Failing row contains (...)``, ``Key (col)=(...) already exists``): when the role sees any
        governed column of that table (of any governed table, if the error names none) other than in
        plaintext, the DETAIL is replaced by a notice that pgveil withheld it."""
        code = next((v for k, v in fields if k == b"C"), "")
        if not code.startswith("23") or not any(k == b"D" for k, _ in fields):
            return None
        catalog = self.ctx.catalog
        schema = next((v for k, v in fields if k == b"s"), None)
        name = next((v for k, v in fields if k == b"t"), None)
        table = catalog.lookup(schema, name) if name is not None else None
        tables = [table] if table is not None else list(catalog.tables.values()) if name is None else []
        view = self._fallback_view()
        if not any(
            view.grant(col).visibility is not Visibility.PLAINTEXT for t in tables for col in t.columns.values()
        ):
            return None
        return tuple(
            (k, "pgveil: the server's detail is withheld: it may show values of governed columns this role may not see")
            if k == b"D"
            else (k, v)
            for k, v in fields
        )

    def _audit_refusing(self) -> bool:
        return self.audit is not None and self.audit.refusing

    def ready_for_query(self, status: bytes) -> None:
        """The server's ReadyForQuery: once the transaction that sent DDL on protected relations has
        ended (committed or not), the catalog is read again for everyone before those relations are used.
        The statement's values read go to the access audit (its anomaly windows count per statement)."""
        if self.values_read and self.audit is not None:
            self.audit.take(self.values_read)
        if self._ddl_open and status == b"I":
            names = self._ddl_names
            self._ddl_open = False
            self._ddl_names = set()
            self.ctx.request_reload(names)

    def _refuse(self, e: ProxyError) -> Outcome:
        return Outcome(codec.encode_frontend(m.Query(REFUSED_QUERY)), None, self.refusal(e))

    # -- extended protocol -----------------------------------------------------------------------------
    def parse(self, msg: m.Parse, generated: GeneratedParameters | None = None) -> Outcome:
        """``generated``: ``msg`` is pgveil's rewrite of the client's Parse with parameters of its own for
        generated subject ids (see _parse_generated)."""
        refused: ProxyError | None = None
        plan = QueryPlan(msg.query)
        try:
            refused = self._reading_refusal(msg.query)
            if refused is None:
                plan = self.ctx.analyze(statement_text(msg.query, self.fmt))
        except StatementTooLarge as e:
            refused = e
        if refused is None and plan.syntax_since > self.fmt.server_major:
            refused = version_refusal(self.fmt.server_major)
        if refused is None:
            refused = self._stale(msg.query, plan)
        if refused is None and not plan.touches_protected:
            return Outcome()
        refused = refused or plan.refusal or self._not_ready()
        if refused is None:
            self._note_ddl(plan)
        if refused is None and len(plan.statements) > 1:
            refused = _unsupported("a prepared statement cannot contain several commands")
        if refused is None and plan.statements:
            refused = _parameter_out_of_range(plan.statements[0].param_targets)
        if isinstance(refused, SubjectNotGiven) and generated is None:
            return self._parse_generated(msg, refused)
        if refused is not None:
            return Outcome(
                codec.encode_frontend(m.Parse(msg.statement, REFUSED_QUERY, ())), None, self.refusal(refused)
            )
        if not plan.statements:
            return Outcome()
        st = plan.statements[0]
        params = {n - 1: self.ctx.column(c) for n, c in st.param_targets.items() if c.encrypted}
        view, refused = self._decided_view(plan.statements)
        try:
            if view is None:
                assert refused is not None
                raise refused
            new_sql, literal_keys = self._encrypt_literals(plan, view)
        except ProxyError as e:
            return Outcome(codec.encode_frontend(m.Parse(msg.statement, REFUSED_QUERY, ())), None, self.refusal(e))
        nulled = frozenset(h.column for h in hidden_for(st, view))
        stmt = StatementCrypto(
            st, params, msg.param_types, self.ctx.result_hint(st), view, nulled, literal_keys, generated
        )
        if not params and new_sql is None and generated is None:
            return Outcome(None, stmt)
        types = list(msg.param_types)
        if params:
            need = max(params) + 1
            if len(types) < need:
                types.extend([0] * (need - len(types)))
            for i in params:
                types[i] = BYTEA_OID
        query = msg.query if new_sql is None else wire_text(new_sql, self.fmt)
        return Outcome(codec.encode_frontend(m.Parse(msg.statement, query, tuple(types))), stmt)

    def _parse_generated(self, msg: m.Parse, refused: SubjectNotGiven) -> Outcome:
        """A Parse of an INSERT that leaves its rows' subject ids to the database: prepared with a parameter
        of pgveil's own per such row (after the client's), bound at each Bind to the ids the server makes
        then (see bind). The client sees only its own parameters (parameter_description)."""
        text = statement_text(msg.query, self.fmt)
        try:
            plan, default = self._generation(text, refused)
            assert default.expression is not None
            given = max(len(msg.param_types), highest_parameter(text))
            if given + plan.rows > _MAX_PARAMETERS:
                raise _unsupported(
                    f"the statement writing {refused.table} with {given} parameters has no room for the "
                    f"{plan.rows} generated values of {refused.subject_column}",
                    hint=f"supply {refused.subject_column} as a parameter",
                )
            new_text = supply_subject_parameters(
                text, refused.table, refused.subject_column, plan, given + 1, default.identity
            )
        except ProxyError as e:
            return Outcome(codec.encode_frontend(m.Parse(msg.statement, REFUSED_QUERY, ())), None, self.refusal(e))
        types = (*msg.param_types, *([0] * (given - len(msg.param_types) + plan.rows)))
        spec = GeneratedParameters(
            given,
            plan.rows,
            default_values_query(default.expression, plan.rows),
            refused.table,
            refused.subject_column,
            default,
        )
        return self.parse(m.Parse(msg.statement, wire_text(new_text, self.fmt), types), spec)

    def parameter_description(self, body: bytes, stmt: CryptoState) -> bytes | None:
        if not isinstance(stmt, StatementCrypto) or not (stmt.params or stmt.generated):
            return None
        (n,) = struct.unpack_from("!H", body, 0)
        oids = list(struct.unpack_from(f"!{n}I", body, 2))
        if stmt.generated is not None:
            n = min(n, stmt.generated.given)  # pgveil's own parameters are not the client's to see
            del oids[n:]
        for target in stmt.targets:
            if target.index < n:
                oids[target.index] = BYTEA_OID if target.envelope else target.column.codec.oid
        return codec.encode_backend(m.ParameterDescription(tuple(oids)))

    def bind(self, msg: m.BindFrame, stmt: StatementCrypto | None, stmt_row_desc: bytes | None) -> Outcome:
        """A Bind with its protected parameters sealed (sent in binary) and protected result columns
        requested in binary. Only what changes is rebuilt; the rest of the message is copied as is."""
        client_formats = msg.result_formats
        if stmt is None:
            if stmt_row_desc is not None and self.ctx.by_attr:
                described = self._described(stmt_row_desc)
                if described is not None:
                    # A statement pgveil had nothing to analyse in (FETCH from a cursor) whose Describe
                    # names governed columns by table OID and attribute number: its rows are served
                    # under the current view like any other result.
                    try:
                        return self._bind_described(msg, described, client_formats, stmt_row_desc)
                    except ProxyError as e:
                        return Outcome(codec.encode_frontend(refused_bind(msg.portal)), None, self.refusal(e))
            if stmt_row_desc is not None:
                # Nothing governed by attribute: its unattributed columns may still be screened.
                view = self._fallback_view()
                screened = self._screened_fields(stmt_row_desc, view)
                if screened:
                    plan = tuple(
                        screen_output(format_for(client_formats, i) == 1, screened[i]) if i in screened else None
                        for i in range(_row_description_count(stmt_row_desc))
                    )
                    return Outcome(None, PortalCrypto(None, client_formats, client_formats, plan, view=view))
            return Outcome(None, PortalCrypto(None, client_formats, client_formats))
        try:
            if stmt.generated is not None:
                msg = self._bind_generated(msg, stmt.generated)
            out = self._bind(msg, stmt, stmt_row_desc, client_formats)
            self._generated = None
            return out
        except ProxyError as e:
            self._generated = None
            # A parameter the proxy cannot seal, or results it could not deliver (a client_encoding it
            # does not support): refused before the server runs anything.
            return Outcome(codec.encode_frontend(refused_bind(msg.portal)), None, self.refusal(e))

    def _bind_generated(self, msg: m.BindFrame, g: GeneratedParameters) -> m.BindFrame:
        """The client's Bind with the generated subject ids appended as text parameters (ValuesMiss until
        the server has made them)."""
        if msg.param_count != g.given:
            raise _BindMismatch(
                f'bind message supplies {msg.param_count} parameters, but prepared statement "{msg.statement}" '
                f"requires {g.given}"
            )
        query = g.query
        current = self.ctx.subject_defaults.get(g.table)
        if current != g.default:
            # The catalog was read again since the Parse: the ids come from the default as it is now, and
            # what pgveil cannot generate now (a trigger created meanwhile) is refused, as a Query would be.
            if current is None or g.default is None or current.identity != g.default.identity:
                raise _unsupported(
                    f"the subject column of table {g.table} changed since the statement was prepared",
                    hint="prepare the statement again",
                )
            check_column_default(current, g.table, g.subject_column)
            assert current.expression is not None
            query = default_values_query(current.expression, g.rows)
        ids = self._generated_ids(("B", msg.body), query, g.rows)
        if len(ids) != g.rows:
            raise _unsupported(
                "the database gave no subject id (NULL) for a row of the INSERT that leaves it to its default",
                hint="supply the subject column",
            )
        formats = msg.param_formats
        if len(formats) == 1:
            formats = formats * g.given
        if formats:
            formats = (*formats, *([0] * g.rows))
        # The ids go back as the bytes the server sent them in (the client_encoding's).
        values = (*msg.params, *(i.encode("utf-8", "surrogateescape") for i in ids))
        return codec.decode_bind_frame(
            codec.encode_bind_body(m.Bind(msg.portal, msg.statement, formats, values, msg.result_formats))
        )

    def _bind(
        self, msg: m.BindFrame, stmt: StatementCrypto, stmt_row_desc: bytes | None, client_formats: tuple[int, ...]
    ) -> Outcome:
        view = self._view_source()
        if stmt.view is None or view.epoch != stmt.view.epoch or self._audit_refusing():
            # The policy or the role's membership changed since the statement was decided: decided again,
            # never served under the rules it was prepared under (so too while an audit anomaly refuses).
            refused = self._policy((stmt.plan,), view) or _nulled_refusal(stmt, view)
            if refused is not None:
                raise refused
            stmt.adopt(view)
        else:
            view = stmt.view
        if stmt.literal_keys:
            self._check_literal_keys(stmt)
        # Checked at each Bind, not only at Parse: a trigger created since is seen once the catalog is read
        # again (both the native and the Python sealing paths seal for these subjects).
        for table, subject_column in stmt.given_subjects:
            self.ctx.check_given_subject(table, subject_column)
        param_formats: tuple[int, ...] | None = None
        sealed: tuple[tuple[int, bytes], ...] = ()
        native: bytes | None = None
        if stmt.targets and len(msg.param_offsets) > 1:  # protected parameters, and values for them
            native = self._seal_native(msg, stmt)
            if native is None:
                param_formats, sealed = self._seal_params(msg, stmt)
        hint = stmt.result_hint
        if stmt_row_desc is not None:
            hint = self._merge_hint(hint, stmt_row_desc)
        ncols = _row_description_count(stmt_row_desc) if stmt_row_desc is not None else None
        if ncols is None and hint is not None:
            ncols = len(hint)
        server_formats: tuple[int, ...] | None = None
        row_plan: RowPlan | None = None
        # A statement that names a governed table may still return only unattributed columns (a
        # function of one): those are screened like any other statement's.
        screened = self._screened_fields(stmt_row_desc, view)
        if hint is not None and ncols == len(hint) and (screened or any(h is not None for h in hint)):
            client = [format_for(client_formats, i) for i in range(ncols)]
            row_plan = tuple(
                (screen_output(client[i] == 1, screened[i]) if i in screened else None)
                if h is None
                else self._output(h, view.grant(h.column), client_binary=client[i] == 1)
                for i, h in enumerate(hint)
            )
            server_formats = tuple(
                client[i] if out is None else int(out.server_binary) for i, out in enumerate(row_plan)
            )
            if stmt_row_desc is not None and self.ctx.subject_attrs:
                desc = codec.decode_backend(ord("T"), stmt_row_desc)
                assert isinstance(desc, m.RowDescription)
                row_plan = self._subject_checks(row_plan, desc.fields, server_formats)
            if list(server_formats) == client and not any(
                out is not None and out.column.encrypted and out.action is not Action.STORED for out in row_plan
            ):
                server_formats = None  # only plain columns and ciphertext, in the client's format: the Bind stays
            self._note_plan(row_plan, view)
        sent_formats = client_formats if server_formats is None else server_formats
        portal = PortalCrypto(stmt, client_formats, sent_formats, row_plan, view=view)
        if native is not None:
            if server_formats is not None:
                native = with_result_formats(native, len(msg.body) - msg.param_offsets[-1], server_formats)
            return Outcome(native, portal)
        if param_formats is None and server_formats is None:
            return Outcome(None, portal)
        return Outcome(codec.encode_bind_frame(msg, param_formats, sealed, server_formats), portal)

    def _check_literal_keys(self, stmt: StatementCrypto) -> None:
        """Each literal of the statement was sealed at Parse under the key current then: once a rotation
        made another key current for its column (or data subject), the statement is refused rather than
        go on storing values under the old key (which the rotation is retiring)."""
        for cc, subject, key_id in stmt.literal_keys:
            column_id = cc.column.column_id
            current = self.ctx.keys.active(column_id) if subject is None else self.ctx.keys.subject(subject, column_id)
            if bytes(current.key_id) != key_id:
                raise _unconfirmed(
                    f"the statement holds a value for column {column_id} sealed when it was prepared, under a "
                    "data key that a rotation has since replaced",
                    hint="prepare the statement again (or send the value as a parameter)",
                )

    def _described(self, row_desc: bytes) -> tuple[ColumnCrypto | None, ...] | None:
        """The governed columns a statement's RowDescription names (cached by its bytes, per catalog)."""
        cache = self._described_cache
        if self._described_catalog is not self.ctx.catalog:
            cache.clear()
            self._described_catalog = self.ctx.catalog
        if row_desc in cache:
            return cache[row_desc]
        hint = self._merge_hint(None, row_desc)
        if len(cache) > 256:
            cache.clear()
        cache[row_desc] = hint
        return hint

    def _bind_described(
        self,
        msg: m.BindFrame,
        hint: tuple[ColumnCrypto | None, ...],
        client_formats: tuple[int, ...],
        row_desc: bytes,
    ) -> Outcome:
        view = self._view_source()
        client = [format_for(client_formats, i) for i in range(len(hint))]
        screened = self._screened_fields(row_desc, view)
        row_plan = tuple(
            (screen_output(client[i] == 1, screened[i]) if i in screened else None)
            if h is None
            else self._output(h, view.grant(h.column), client_binary=client[i] == 1)
            for i, h in enumerate(hint)
        )
        self._note_plan(row_plan, view)
        server_formats = tuple(client[i] if out is None else int(out.server_binary) for i, out in enumerate(row_plan))
        portal = PortalCrypto(None, client_formats, server_formats, row_plan, view=view)
        if list(server_formats) == client:
            return Outcome(None, portal)
        return Outcome(codec.encode_bind_frame(msg, None, (), server_formats), portal)

    def _screened_fields(self, row_desc: bytes | None, view: RoleView) -> dict[int, bool]:
        """The fields of a statement's RowDescription that results under ``view`` screen (see _screens),
        each with whether it is a bytea (screened as a whole value); none when the statement was not
        described (then a Describe of the portal plans its rows)."""
        if row_desc is None or not self._screens(view):
            return {}
        desc = codec.decode_backend(ord("T"), row_desc)
        assert isinstance(desc, m.RowDescription)
        return {
            i: f.type_oid == BYTEA_OID
            for i, f in enumerate(desc.fields)
            if f.type_oid not in _UNSCREENED and self.ctx.by_attr.get((f.table_oid, f.column_attnum)) is None
        }

    def _merge_hint(
        self, hint: tuple[ColumnCrypto | None, ...] | None, row_desc: bytes
    ) -> tuple[ColumnCrypto | None, ...] | None:
        """The statement's RowDescription (table OID, attribute number) identifies protected columns the
        text analysis could not place (``SELECT *`` over a join); it wins where it knows."""
        desc = codec.decode_backend(ord("T"), row_desc)
        assert isinstance(desc, m.RowDescription)
        merged: list[ColumnCrypto | None] = []
        for i, f in enumerate(desc.fields):
            cc = self.ctx.by_attr.get((f.table_oid, f.column_attnum)) if f.table_oid else None
            if cc is None and hint is not None and i < len(hint):
                cc = _hinted(hint[i], f)
            merged.append(cc)
        return tuple(merged) if any(c is not None for c in merged) else hint

    def _seal_native(self, msg: m.BindFrame, stmt: StatementCrypto) -> bytes | None:
        """The whole Bind with its protected parameters sealed, in one native call (see
        proxy/encrypt/bindseal.py); None when the statement or one of its values takes the Python path,
        :meth:`_seal_params`, which stays the reference."""
        sealer = stmt.sealer
        if sealer is None or not self._utf8_client:
            return None
        done = sealer.seal(msg.body, self.ctx.write_key, self.ctx.keys)
        if done is None:
            return None
        self.values_encrypted += done[1]
        return done[0]

    def _seal_params(
        self, msg: m.BindFrame, stmt: StatementCrypto
    ) -> tuple[tuple[int, ...], tuple[tuple[int, bytes], ...]]:
        """(the parameter formats to send, one per parameter; the sealed values by parameter index)."""
        n = len(msg.param_offsets) - 1
        client = msg.param_formats
        if not client:
            formats = [0] * n
        elif len(client) == 1:
            formats = [client[0]] * n
        else:
            formats = [client[i] if i < len(client) else 0 for i in range(n)]
        body = msg.body
        offsets = msg.param_offsets
        utf8 = self._utf8_client
        unpack = _I32.unpack_from
        write_key = self.ctx.write_key
        keys: list[DataKey | None] = [None] * stmt.key_slots
        subject_keys: dict[Subject, DataKey] = {}
        subjects: dict[SubjectValue, Subject] = {}
        sealed: list[tuple[int, bytes]] = []
        passed = 0
        for target in stmt.targets:
            i = target.index
            if i >= n:
                continue
            off = offsets[i]
            (length,) = unpack(body, off)
            if length < 0:
                continue  # NULL stays NULL
            value = body[off + 4 : off + 4 + length]
            subject = None if target.subject is None else self._bound_subject(target.subject, msg, formats, subjects)
            if target.envelope:  # a ciphertext role's stored envelope: checked, then passed on unchanged
                envelope = value if formats[i] == 1 else self._bytea_value(target.column, value)
                self.ctx.check_envelope(target.column, envelope, self.ctx.key_lookup, subject)
                sealed.append((i, envelope))
                formats[i] = 1
                passed += 1
                continue
            # Unbounded text from a UTF-8 client: pure ASCII without NUL is valid and already canonical
            # (what TextCodec returns after its full check); anything else takes the codec's path.
            if formats[i] == 1:
                if target.binary_as_is and utf8 and value.isascii() and b"\x00" not in value:
                    canonical = value
                else:
                    canonical = self._canonical_binary(target.column, value, target.client_oid)
            elif target.text_as_is and utf8 and value.isascii() and b"\x00" not in value:
                canonical = value
            else:
                canonical = self._canonical_text(target.column, value)
            # One key per column (or data subject) for this Bind; the next Bind looks it up again, so a key
            # disabled or invalidated meanwhile is never used.
            if subject is not None:
                key = subject_keys.get(subject)
                if key is None:
                    key = subject_keys[subject] = self.ctx.subject_write_key(subject, target.column_id)
            elif target.key_slot < 0:
                raise _unsupported(f"no data subject for a value of column {target.column_id}")
            else:
                key = keys[target.key_slot]
                if key is None:
                    key = keys[target.key_slot] = write_key(target.column_id)
            sealed.append((i, seal(key, canonical, target.associated)))
            formats[i] = 1
        self.values_encrypted += len(sealed) - passed
        if not stmt.targets_in_order:
            sealed.sort(key=_first)
        return tuple(formats), tuple(sealed)

    def _bound_subject(
        self, source: SubjectValue, msg: m.BindFrame, formats: list[int], memo: dict[SubjectValue, Subject]
    ) -> Subject:
        """The data subject of a Bind's row: its literal, or the value (text or binary) of its parameter."""
        subject = memo.get(source)
        if subject is not None:
            return subject
        if source.literal is not None:
            raw = self._client_subject(source.table, source.subject, statement_bytes(source.literal, self.fmt))
            subject = subject_from_text(source.table, source.subject, raw)
        else:
            j = (source.param or 0) - 1
            n = len(msg.param_offsets) - 1
            length = -1 if not 0 <= j < n else _I32.unpack_from(msg.body, msg.param_offsets[j])[0]
            if length < 0:
                raise InvalidSubject(
                    f"pgveil: the subject id for column {source.subject.column} of {source.table} is NULL "
                    "or missing, so the row has no data subject to encrypt it for"
                )
            off = msg.param_offsets[j] + 4
            data = self._client_subject(source.table, source.subject, msg.body[off : off + length])
            if formats[j] == 1:
                subject = subject_from_binary(source.table, source.subject, data)
            else:
                subject = subject_from_text(source.table, source.subject, data)
        memo[source] = subject
        return subject

    def _client_subject(self, table: str, subject: SubjectColumn, raw: bytes) -> bytes:
        """``raw``, a text subject id as the client sent it, when its bytes are the id's UTF-8 bytes: always
        from a UTF8 client, and for an ASCII id from any client. A non-ASCII text id from a client in
        another encoding is refused (0A000): the server stores it converted to UTF-8, so its bytes here
        name another subject than the row's, and the values would be sealed under a key that shredding
        the row's subject does not destroy. (Integer and uuid ids are ASCII in every encoding.)"""
        if self._utf8_client or subject.type_class != "text" or raw.isascii():
            return raw
        raise _unsupported(
            f"cannot seal the encrypted columns of {table} for the subject id in {subject.column}: it is not "
            f"ASCII and the session's client_encoding is {self.fmt.client_encoding}, not UTF8",
            hint="set client_encoding to UTF8 for writes with non-ASCII subject ids",
        )

    # -- results ---------------------------------------------------------------------------------------
    def row_description(
        self,
        body: bytes,
        hint: tuple[ColumnCrypto | None, ...] | None,
        client_formats: Sequence[int] | None,
        view: RoleView | None = None,
    ) -> tuple[bytes | None, RowPlan | None]:
        """The RowDescription the client sees and the plan for the DataRows that follow, under ``view``
        (the one its statement was decided under; the current one if it had none).

        ``client_formats`` is None for a statement Describe (formats not known yet: all zero)."""
        if view is None:
            view = self._fallback_view()
        desc = codec.decode_backend(ord("T"), body)
        assert isinstance(desc, m.RowDescription)
        fields = list(desc.fields)
        plan: list[ColumnOutput | None] = []
        changed = False
        attnums = self.ctx.attnums
        screens = self._screens(view)
        for i, f in enumerate(fields):
            cc = self.ctx.by_attr.get((f.table_oid, f.column_attnum)) if f.table_oid else None
            if f.table_oid in attnums:
                self._check_attribute(f, cc)
                if hint is not None and i < len(hint):
                    self._check_hint(f, hint[i])
            if cc is None and hint is not None and i < len(hint):
                cc = _hinted(hint[i], f)
            if cc is None:
                plan.append(
                    screen_output(f.format == 1, f.type_oid == BYTEA_OID)
                    if screens and f.type_oid not in _UNSCREENED
                    else None
                )
                continue
            client_fmt = 0 if client_formats is None else format_for(client_formats, i)
            out = self._output(cc, view.grant(cc.column), client_binary=client_fmt == 1, server_binary=f.format == 1)
            plan.append(out)
            if presents_declared_type(cc.column, out.action):
                fields[i] = m.FieldDescription(
                    f.name, f.table_oid, f.column_attnum, cc.codec.oid, cc.codec.typlen, cc.codec.typmod, client_fmt
                )
                changed = True
        if all(out is None for out in plan):
            return None, None
        row_plan = self._subject_checks(tuple(plan), desc.fields, [f.format for f in desc.fields])
        self._note_plan(row_plan, view)
        return (codec.encode_backend(m.RowDescription(tuple(fields))) if changed else None), row_plan

    def _subject_checks(
        self, plan: RowPlan, fields: Sequence[m.FieldDescription], server_formats: Sequence[int]
    ) -> RowPlan:
        """Marks each value of a column with per-subject keys whose row's subject column is in the same
        result (same relation, once) so that its key is checked against it (rows._check_subjects)."""
        subject_attrs = self.ctx.subject_attrs
        if not subject_attrs:
            return plan
        out: list[ColumnOutput | None] = list(plan)
        for i, o in enumerate(plan):
            if o is None or o.column.subject_kind is None or i >= len(fields):
                continue
            found = subject_attrs.get(fields[i].table_oid)
            if found is None:
                continue
            attnum, subject, table = found
            at = [j for j, f in enumerate(fields) if f.table_oid == fields[i].table_oid and f.column_attnum == attnum]
            if len(at) == 1:
                j = at[0]
                binary = j < len(server_formats) and server_formats[j] == 1
                out[i] = dataclasses.replace(
                    o, subject_at=j, subject=subject, subject_table=table, subject_binary=binary
                )
        return tuple(out)

    def _screens(self, view: RoleView) -> bool:
        """Whether results served under ``view`` screen their unattributed columns for envelopes
        (Action.SCREEN): when some encrypted column is neither plaintext nor ciphertext to the role, a
        value of it reached through a path pgveil cannot attribute (a function, a view's opaque
        expression, a type pgveil does not follow) is restricted as the column would be, never served
        as the server sends it. Cached per view and catalog."""
        cached = self._screening
        catalog = self.ctx.catalog
        if cached is not None and cached[0] is view and cached[1] is catalog:
            return cached[2]
        open_ = (Visibility.PLAINTEXT, Visibility.CIPHERTEXT)
        restricted = any(
            col.encrypted and view.grant(col).visibility not in open_
            for table in catalog.tables.values()
            for col in table.columns.values()
        )
        self._screening = (view, catalog, restricted)
        return restricted

    def _check_attribute(self, f: m.FieldDescription, cc: ColumnCrypto | None) -> None:
        """A field of a protected relation must agree with the catalog: a protected attribute is bytea,
        and every attribute number is one the catalog read. Otherwise the table changed behind pgveil."""
        if f.column_attnum <= 0:
            return  # a system column
        if (
            cc is not None and cc.column.encrypted and f.type_oid != BYTEA_OID
        ) or f.column_attnum not in self.ctx.attnums[f.table_oid]:
            self.ctx.request_reload()
            raise _stale_error(
                "a result column of a table with encrypted columns does not match pgveil's catalog; it is being "
                "read again",
                "retry the statement",
            )

    def _check_hint(self, f: m.FieldDescription, hinted: ColumnCrypto | None) -> None:
        """The analysis placed another attribute of the same relation at this position than the server
        reports: the statement was read against a catalog that is behind the table (a column dropped and
        another renamed to its name, as ``pgveil encrypt`` swaps them), and a Bind sent before this reply
        may already serve its rows by that reading. Refused, and the catalog read again."""
        col = None if hinted is None else hinted.column
        if col is not None and col.table_oid == f.table_oid and col.attnum and col.attnum != f.column_attnum:
            self.ctx.request_reload()
            raise _stale_error(
                "a result column of a governed table is not the column pgveil's catalog names; it is being read again",
                "retry the statement",
            )

    def _note_plan(self, plan: RowPlan, view: RoleView) -> None:
        """Remembers what each row of ``plan`` serves, by (the view's metric label, outcome) (bounded)."""
        served: dict[tuple[str, str, str], int] = {}
        label = view.label
        for p in plan:
            if p is not None and p.action is not Action.SCREEN:
                key = (label, p.column.column_id, OUTCOMES[view.grant(p.column).visibility])
                served[key] = served.get(key, 0) + 1
        kept = self._plan_served
        if len(kept) > 256:
            kept.clear()
        kept[id(plan)] = (plan, tuple(served.items()))

    def _new_memo(self, plan: RowPlan) -> None:
        self._memo_plan = plan
        self._memo = {b"o": (self.ctx.key_lookup, self.ctx.shared_opener())}
        self._memo_count = sum(1 for p in plan if p is not None and p.action in _DECRYPTING)
        noted = self._plan_served.get(id(plan))
        self._memo_served = noted[1] if noted is not None and noted[0] is plan else ()

    def _count_served(self, rows: int) -> None:
        counts, read = self.values_served, self.values_read
        for key, n in self._memo_served:
            served = (key[0], key[2])
            counts[served] = counts.get(served, 0) + n * rows
            read[key] = read.get(key, 0) + n * rows

    def data_rows(self, data: bytes, start: int, end: int, plan: RowPlan, rows: int) -> bytes:
        """A run of complete DataRow messages ``data[start:end]``, rewritten (see rows.rewrite_data_rows)."""
        if plan is not self._memo_plan or len(self._memo) > 256:
            self._new_memo(plan)
        try:
            out = rewrite_data_rows(data, start, end, plan, self.ctx.key_lookup, self.fmt, self._memo)
        except KeyMiss as miss:
            if miss.key_id is None or miss.key_ids:
                raise
            # Every key this run needs that memory lacks, fetched in one keystore query (a result of many
            # data subjects would otherwise wait for one fetch per subject).
            missing = self.ctx.keys.missing(run_key_ids(data, start, end, plan))
            raise KeyMiss(key_id=miss.key_id, key_ids=missing) from None
        except RowDecryptError:
            # Deliver the rows before the bad one, as a row-at-a-time proxy would, then the error.
            good: list[bytes] = []
            pos = start
            while pos < end:
                (ln,) = struct.unpack_from("!I", data, pos + 1)
                try:
                    row = self.data_row(data[pos + 5 : pos + 1 + ln], plan)
                except DecryptionError as e:
                    e.partial = b"".join(good)
                    raise
                good.append(codec.frame(b"D", row))
                pos += 1 + ln
            raise AssertionError("a failing batch has a failing row") from None
        self.values_decrypted += self._memo_count * rows
        self._count_served(rows)
        return out

    def data_row(self, body: bytes, plan: RowPlan) -> bytes:
        # The keys a result's rows use are remembered for that result only (a new row plan starts a
        # new memory, bounded), so every result sees keys disabled or destroyed before it started.
        if plan is not self._memo_plan or len(self._memo) > 256:
            self._new_memo(plan)
        try:
            out = rewrite_data_row(body, plan, self.ctx.key_lookup, self.fmt, self._memo)
        except RowDecryptError as e:
            self.decrypt_failures += 1
            col = e.column
            log.warning("a value of column %s could not be decrypted: %s", col.column_id, e.reason)
            raise DecryptionError(
                f"pgveil: a value of column {col.column_id} could not be decrypted",
                hint="the value was tampered with, moved from another column, or its key is gone",
            ) from None
        self.values_decrypted += self._memo_count
        self._count_served(1)
        return out

    # -- COPY ------------------------------------------------------------------------------------------
    def copy_in_rewriter_for(self, state: object) -> CopyRowRewriter | None:
        """The rewriter for the COPY FROM STDIN a Query or Execute will start, if it copies into protected
        columns; built when the client sends the statement (see arm_copy_in)."""
        plans: tuple[StatementPlan, ...]
        if isinstance(state, PortalCrypto) and (state.statement is None or not state.statement.copies_in):
            return None  # every Execute asks: answered from what was worked out at Parse
        if isinstance(state, QueryCrypto):
            plans = state.statements
        elif isinstance(state, PortalCrypto) and state.statement is not None:
            plans = (state.statement.plan,)
        else:
            return None
        copies = [i for i, st in enumerate(plans) if _copies_in_protected(st)]
        if not copies:
            return None
        if isinstance(state, QueryCrypto):
            return self.copy_rewriter(QueryCrypto(state.statements, copies[0], state.view), b"", inbound=True)
        return self.copy_rewriter(state, b"", inbound=True)

    def copy_rewriter(self, state: object, body: bytes, *, inbound: bool) -> CopyRowRewriter | None:
        """A row rewriter for the COPY that the server just started, or None if it carries no protected
        column. Keys for COPY FROM are checked first (KeyMiss), so a stream never stops half-way."""
        st = _copy_current_statement(state)
        if st is None or st.copy is None:
            return None
        cp = st.copy
        # COPY FROM seals (or checks) encrypted columns only; COPY TO serves every governed column.
        columns = cp.protected if inbound else _governed_columns(cp)
        if not any(c is not None for c in columns):
            return None
        view = state.view if isinstance(state, QueryCrypto | PortalCrypto) else None
        if view is None:
            view = self._fallback_view()
        transforms = CopyTransforms(self)
        row_field: tuple[int, Callable[[bytes | None], None]] | None = None
        if inbound and cp.subject_index >= 0 and cp.table is not None and cp.table.subject is not None:
            self.ctx.check_given_subject(cp.table.qualified_name, cp.table.subject)
            row_field = (cp.subject_index, transforms.subject_reader(cp.table.qualified_name, cp.table.subject))
        fields: list[Callable[[bytes], bytes | None] | None] = []
        served: dict[tuple[str, str, str], int] = {}
        for col in columns:
            if col is None:
                fields.append(None)
                continue
            cc = self.ctx.column(col)
            grant = view.grant(col)
            if inbound:
                if not col.encrypted:
                    fields.append(None)  # a plain column is written as the client sends it
                elif writes_envelopes(col, grant):
                    fields.append(transforms.envelope_checker(cc))
                elif col.subject_kind is not None:
                    # Each row's subject key: a miss retries the CopyData message (copy_in_data).
                    fields.append(transforms.sealer(cc))
                else:
                    self.ctx.keys.active(col.column_id)  # KeyMiss now, not half-way through the stream
                    fields.append(transforms.sealer(cc))
            else:
                key = (view.label, col.column_id, OUTCOMES[grant.visibility])
                served[key] = served.get(key, 0) + 1
                out = self._output(cc, grant, client_binary=False, server_binary=False)
                fields.append(None if out.action is Action.STORED else transforms.opener(out))
        if all(f is None for f in fields):
            if not inbound:
                self._copy_out_served = tuple(served.items())
                self._copy_out_counting = True
            return None  # every field goes on as the server (or the client) sends it
        if cp.format is CopyFormat.BINARY or (body[:1] == b"\x01"):
            # The analysis refuses binary COPY of protected columns (and the decision binary COPY TO of a
            # governed column the role may not read); a server that still chose binary cannot be
            # rewritten, so the session must end rather than pass ciphertext or plaintext on.
            raise ProtocolViolation("server", "binary COPY of a protected table")
        if not inbound:
            self._copy_out_served = tuple(served.items())
        o = cp.options
        if (o.encoding is not None and o.encoding.upper().replace("-", "").replace("_", "") != "UTF8") or (
            self.fmt.client_encoding.upper().replace("-", "").replace("_", "") not in ("UTF8", "UNICODE")
        ):
            raise _unsupported(f"COPY of protected table {cp.table.qualified_name if cp.table else ''} needs UTF8")

        # COPY table: the column list; COPY (query): the protected result columns' names (the others'
        # bytes pass untouched, already quoted by the server). An alias in FORCE_* is not matched.
        wire_names: tuple[str | None, ...] = cp.columns or tuple(
            None if c is None else c.name for c in (st.result_columns or ())
        )

        def positions(names: tuple[str, ...]) -> frozenset[int]:
            return frozenset(i for i, c in enumerate(wire_names) if c is not None and c in names)

        csv = cp.format is CopyFormat.CSV
        options = CopyOptions(
            format="csv" if csv else "text",
            delimiter=o.delimiter,
            null=o.null,
            quote=o.quote if csv else None,
            escape=o.escape if csv else None,
            header=o.header or o.header_match,
            force_quote=frozenset(range(len(cp.protected))) if o.force_quote_all else positions(o.force_quote),
            force_not_null=positions(o.force_not_null),
            force_null=positions(o.force_null),
        )
        return CopyRowRewriter(options, fields, row_field=row_field)

    # -- the relay's seam: proxy.protocol.encryption.SessionEncryption --------------------------------
    def sql_namespace(self, sql: str) -> tuple[NamespaceOp, ...]:
        ops = namespace_ops(sql)
        if ops and not self.ctx.catalog.tables:  # nothing governed: a DO block's statements need no distrust
            ops = tuple(op for op in ops if op.action is not NamespaceAction.REPLACE_ALL)
        return ops

    def execute_refusal(self, name: str, versions: Sequence[Version], *, deferred: bool) -> bytes | None:
        if not self.ctx.catalog.tables:
            return None
        prepared = self._sql_prepared.get(name)
        if prepared is not None:
            try:
                view = self._view_source()
                same = view.epoch == prepared[1] and not self._audit_refusing()
                refused = None if same else self._policy(prepared[0], view)
            except ProxyError as unknown:
                refused = unknown
            if refused is not None:
                return self.refusal(refused)
            self._sql_prepared[name] = (prepared[0], view.epoch)
        if not name:
            e = _unconfirmed(
                "an SQL-level EXECUTE in a statement text too long for pgveil to read a second time "
                f"(over {MAX_PARSED_TEXT} bytes) is not supported while tables are encrypted",
                hint="send EXECUTE in a statement of its own",
            )
        elif deferred:
            e = _unconfirmed(
                f"SQL-level EXECUTE of prepared statement {name!r} in a prepared statement is not supported "
                "while tables are encrypted: the statement it names may change before it runs",
                hint="send EXECUTE as a simple query, or bind the prepared statement directly",
            )
        elif not versions:
            e = _unconfirmed(
                f"EXECUTE of prepared statement {name!r}, which pgveil has not seen prepared",
                hint="prepare it through pgveil first",
            )
        elif any(isinstance(v[0], StatementCrypto) and v[0].targets for v in versions):
            e = _unsupported(
                f"SQL-level EXECUTE of prepared statement {name!r}, which takes parameters for encrypted "
                "columns, is not supported",
                hint="bind its parameters with the extended query protocol",
            )
        else:
            return None
        return self.refusal(e)

    def handle_bind(self, msg: m.BindFrame, versions: Sequence[Version]) -> Outcome:
        if not versions:
            if not self.ctx.catalog.tables:
                return Outcome(None, PortalCrypto(None, msg.result_formats, msg.result_formats))
            return self._refuse_bind(
                msg,
                _unconfirmed(
                    f"Bind to prepared statement {msg.statement!r}, which pgveil has not seen prepared",
                    hint="prepare statements through pgveil; after a DO block with dynamic SQL, which may have "
                    "replaced any of them, close the statement and prepare it again",
                ),
            )
        state, row_description = versions[0]
        if len(versions) > 1:
            if any(v[0] is not state and v[0] != state for v in versions) and any(v[0] is not None for v in versions):
                return self._refuse_bind(
                    msg,
                    _unconfirmed(
                        f"the state of prepared statement {msg.statement!r} is not confirmed by the server yet "
                        "(an earlier Parse or Close of that name is still unanswered)",
                        hint="wait for the reply to the Parse or Close (Sync) before binding the statement",
                    ),
                )
            if any(v[1] != row_description for v in versions):
                row_description = None
        stmt = state if isinstance(state, StatementCrypto) else None
        return self.bind(msg, stmt, row_description)

    def _refuse_bind(self, msg: m.BindFrame, e: ProxyError) -> Outcome:
        return Outcome(codec.encode_frontend(refused_bind(msg.portal)), None, self.refusal(e))

    def handle_execute(self, portal: str, versions: Sequence[CryptoState | None]) -> Outcome:
        state = versions[0] if versions else None
        if (
            len(versions) > 1
            and any(v is not state and v != state for v in versions)
            and any(
                isinstance(v, PortalCrypto) and (v.statement is not None or v.row_plan is not None) for v in versions
            )
        ):
            e = _unconfirmed(
                f"the state of portal {portal!r} is not confirmed by the server yet "
                "(an earlier Bind or Close of that name is still unanswered)",
                hint="wait for the reply to the Bind (Sync) before executing the portal",
            )
            return Outcome(codec.encode_frontend(refused_bind()), None, self.refusal(e))
        if not isinstance(state, PortalCrypto):
            return Outcome()
        if state.needs_description():
            stand_in, refusal = refused_execute()
            self.refused[_EXECUTE_REFUSAL] = self.refused.get(_EXECUTE_REFUSAL, 0) + 1
            return Outcome(stand_in, None, refusal)
        if state.statement is not None or state.row_plan is not None:
            try:
                self._recheck_portal(state)
            except ProxyError as e:
                return Outcome(codec.encode_frontend(refused_bind()), None, self.refusal(e))
        st = state.statement
        if st is not None and st.copies_in:
            self.arm_copy_in(state)
        return Outcome(None, state)

    def _recheck_portal(self, portal: PortalCrypto) -> None:
        """A portal bound under another epoch than the current one is decided again before it runs (also
        between the partial Executes of a named portal); its rows are then served under the new view, if
        the RowDescription the client has still describes them (else refused: bind it again)."""
        stmt = portal.statement
        view = self._view_source()
        if portal.view is None or view.epoch == portal.view.epoch:
            return
        refused = (self._policy((stmt.plan,), view) or _nulled_refusal(stmt, view)) if stmt is not None else None
        if refused is not None:
            raise refused
        plan = portal.row_plan
        if plan is not None:
            new: list[ColumnOutput | None] = []
            for out in plan:
                if out is None or out.action is Action.SCREEN:
                    new.append(out)  # screening stays: it never shows more
                    continue
                cc = ColumnCrypto(out.column, out.codec, out.associated)
                replaced = self._output(cc, view.grant(out.column), client_binary=out.client_binary)
                if replaced.server_binary != out.server_binary or presents_declared_type(
                    out.column, replaced.action
                ) != presents_declared_type(out.column, out.action):
                    e = _unconfirmed(
                        f"the visibility policy of column {out.column.column_id} changed since portal was bound, "
                        "and its rows no longer have the form the portal was described with",
                        hint="bind the statement again",
                    )
                    e.reason = RefusalReason.POLICY_DENIED
                    raise e
                new.append(replaced)
            row_plan = tuple(new)
            self._note_plan(row_plan, view)
            portal.row_plan = row_plan
        portal.view = view

    def describe_portal(self, versions: Sequence[CryptoState | None]) -> None:
        for v in versions:
            if isinstance(v, PortalCrypto):
                v.described = True

    def statement_state(self, name: str) -> CryptoState | None:
        return self._stmt_crypto.get(name)

    def portal_state(self, name: str) -> CryptoState | None:
        return self._portal_crypto.get(name)

    def set_statement(self, name: str, state: CryptoState | None) -> None:
        if isinstance(state, StatementCrypto):
            self._stmt_crypto[name] = state
        else:
            self._stmt_crypto.pop(name, None)

    def set_portal(self, name: str, state: CryptoState | None) -> None:
        portals = self._portal_crypto
        if isinstance(state, PortalCrypto):
            if len(portals) > 1000 and name not in portals:
                portals.clear()  # named portals the client never closed; bounded memory
            portals[name] = state
        else:
            portals.pop(name, None)

    def close(self, kind: bytes, name: str) -> None:
        (self._stmt_crypto if kind == b"S" else self._portal_crypto).pop(name, None)
        if kind == b"S":
            self._sql_prepared.pop(name, None)

    def close_all(self, kind: bytes) -> None:
        (self._stmt_crypto if kind == b"S" else self._portal_crypto).clear()
        if kind == b"S":
            self._sql_prepared.clear()

    def arm_copy_in(self, state: CryptoState | None) -> None:
        """A statement that copies into a protected table: its row rewriter starts now, when the client
        sends the statement, not when the server answers. Clients may send the rows without waiting
        for CopyInResponse (asyncpg does), and none of them may reach the server unrewritten."""
        if self._copy_in_rw is not None or state is None:
            return
        rw = self.copy_in_rewriter_for(state)  # KeyMiss: the message is retried once the key is in
        if rw is not None:
            self._copy_in_rw = rw
            self._copy_in_failed = False
            self.copy_in_armed = True

    def disarm_copy_in(self) -> None:
        self._copy_in_rw = None
        self._copy_in_failed = False
        self.copy_in_armed = False

    def copy_in_data(self, body: bytes) -> bytes | None:
        if self._copy_in_failed:
            return b""
        rw = self._copy_in_rw
        if rw is None:
            return None
        before = rw.snapshot()
        try:
            rows = rw.feed(body)
        except KeyMiss:
            # A data subject's key is not in memory: the relay holds this message, the session fetches the
            # key, and the message is fed again from the same state.
            rw.restore(before)
            raise
        except ProtocolViolation:
            raise
        except ProxyError:
            self._copy_in_failed = True  # the rest of the client's rows is dropped
            raise
        return codec.frame(b"d", rows) if rows else b""

    def copy_in_end(self, done: bool) -> bytes | None:
        rw, failed = self._copy_in_rw, self._copy_in_failed
        self.disarm_copy_in()
        if failed:
            return b""  # the server's COPY was aborted already
        if rw is None or not done:  # no rewriting, or CopyFail: the server aborts the COPY itself
            return None
        tail = rw.finish()  # a ProxyError: the relay aborts the server's COPY
        end = codec.frame(b"c", b"")
        return (codec.frame(b"d", tail) + end) if tail else None

    def statement_row_description(self, body: bytes, state: CryptoState | None) -> bytes | None:
        if isinstance(state, StatementCrypto):
            replacement, _ = self.row_description(body, state.result_hint, None, state.view)
            return replacement
        replacement, _ = self.row_description(body, None, None)
        return replacement

    def portal_row_description(self, body: bytes, state: CryptoState | None, formats: tuple[int, ...]) -> bytes | None:
        if not isinstance(state, PortalCrypto):
            replacement, _ = self.row_description(body, None, formats)
            return replacement
        hint = state.statement.result_hint if state.statement is not None else None
        view = state.view if state.view is not None else self._fallback_view()
        replacement, plan = self.row_description(body, hint, state.client_formats, view)
        if plan is not None:
            state.row_plan = plan
            state.view = view
        return replacement

    def result_row_description(self, body: bytes, state: CryptoState | None) -> tuple[bytes | None, bool]:
        if isinstance(state, QueryCrypto):
            hint, view = state.current_hint(self.ctx), state.view
        else:
            hint, view = None, None
        replacement, plan = self.row_description(body, hint, None, view)  # simple Query: text format throughout
        self._row_plan = plan
        return replacement, plan is not None

    def execute_rows(self, state: CryptoState) -> bool:
        plan = state.row_plan if isinstance(state, PortalCrypto) else None
        if plan is None:
            return False
        self._row_plan = plan
        return True

    def data_rows_current(self, data: bytes, start: int, end: int, rows: int) -> bytes:
        plan = self._row_plan
        assert plan is not None
        return self.data_rows(data, start, end, plan, rows)

    def statement_done(self, state: CryptoState) -> None:
        if isinstance(state, QueryCrypto):
            state.index += 1  # the next statement of a multi-statement Query

    def copy_in_response(self, state: CryptoState | None, body: bytes) -> None:
        if self._copy_in_rw is not None:
            return  # armed when the client sent the statement
        rw = self.copy_rewriter(state, body, inbound=True)
        if rw is not None:
            self._copy_in_rw = rw
            self._copy_in_failed = False
            self.copy_in_armed = True

    def copy_out_response(self, state: CryptoState | None, body: bytes) -> bool:
        self._copy_out_served = ()
        self._copy_out_counting = False
        self._copy_out_rw = self.copy_rewriter(state, body, inbound=False)
        if self._copy_out_counting:
            # Nothing to rewrite, but the rows are counted for the metrics: the relay hands them over.
            self._copy_out_rows = 0
            return True
        return self._copy_out_rw is not None

    def copy_out_data(self, body: bytes) -> bytes:
        rw = self._copy_out_rw
        if rw is None:  # counted only (see copy_out_response): a text or CSV row ends with a newline
            self._copy_out_rows += body.count(b"\n")
            return codec.frame(b"d", body)
        rows = rw.feed(body)
        return codec.frame(b"d", rows) if rows else b""

    def copy_out_done(self) -> bytes | None:
        rw, self._copy_out_rw = self._copy_out_rw, None
        counted = self._copy_out_rows if rw is None else rw.rows
        for key, n in self._copy_out_served:
            served = (key[0], key[2])
            self.values_served[served] = self.values_served.get(served, 0) + n * counted
            self.values_read[key] = self.values_read.get(key, 0) + n * counted
        self._copy_out_served = ()
        self._copy_out_counting = False
        self._copy_out_rows = 0
        tail = rw.finish() if rw is not None else b""
        return codec.frame(b"d", tail) + codec.frame(b"c", b"") if tail else None


class _NotAnEnvelope(ProxyError):
    sqlstate = "22023"
    reason = RefusalReason.VALUE


def _mask_key_missing(column: ProtectedColumn) -> MaskKeyMissing:
    return MaskKeyMissing(
        f"pgveil: column {column.column_id} is served with the hash mask, whose key is kept in the keystore, "
        "and no keystore is configured",
        hint="configure keystore: for the hash mask, or grant the role another mask",
    )


class _BadParameterType(ProxyError):
    sqlstate = "42804"
    reason = RefusalReason.VALUE


class StatementTooLarge(ProxyError):
    """A statement that may name a protected table is longer than pgveil analyses."""

    sqlstate = "54000"
    reason = RefusalReason.LIMITS


class _UndefinedParameter(ProxyError):
    sqlstate = "42P02"
    reason = RefusalReason.LIMITS


# A Bind carries at most 65535 parameter values (its count is an Int16): a statement naming a higher
# $n can never be executed, and the rewritten Parse could not even declare its type.
_MAX_PARAMETERS = 65535


def _parameter_out_of_range(targets: Mapping[int, object]) -> ProxyError | None:
    """Checked before anything is sized by a parameter number (``$2147483647`` is 50 bytes of SQL)."""
    if not targets:
        return None
    n = max(targets)
    if 0 < n <= _MAX_PARAMETERS:
        return None
    return _UndefinedParameter(
        f"there is no parameter ${n}", hint=f"a Bind message carries at most {_MAX_PARAMETERS} parameters"
    )


class _BindMismatch(ProxyError):
    """A Bind with another number of parameters than its statement takes (the server's own error)."""

    sqlstate = "08P01"


# A Bind carries at most 65,535 parameters (Int16 count).
_MAX_PARAMETERS = 65535


def _unsupported(message: str, hint: str | None = None) -> ProxyError:
    e = ProxyError(f"pgveil: {message}", hint=hint, reason=RefusalReason.CONSTRUCT)
    e.sqlstate = "0A000"
    return e


def _unconfirmed(message: str, hint: str | None = None) -> ProxyError:
    """A refusal because a statement's or portal's state on the server is not known to pgveil."""
    e = ProxyError(f"pgveil: {message}", hint=hint, reason=RefusalReason.STATEMENT_STATE)
    e.sqlstate = "0A000"
    return e


_MAX_STALE_NAMES = 4096  # bounded memory whatever the notifications say


def _names_identifier(lowered: str, name: str) -> bool:
    """Whether ``name`` occurs in ``lowered`` as a whole identifier (not inside a longer one); a quoted
    identifier containing it, a comment or a string count too, which only errs towards refusing."""
    start = lowered.find(name)
    while start >= 0:
        end = start + len(name)
        before = lowered[start - 1] if start else " "
        after = lowered[end] if end < len(lowered) else " "
        if not (before.isalnum() or before in "_$") and not (after.isalnum() or after in "_$"):
            return True
        start = lowered.find(name, start + 1)
    return False


def _stale_error(message: str, hint: str) -> ProxyError:
    e = ProxyError(f"pgveil: {message}", hint=hint, reason=RefusalReason.STALE_CATALOG)
    e.sqlstate = "55000"
    return e


def hidden_for(st: StatementPlan, view: RoleView) -> list[HiddenOutput]:
    """The entries of ``st``'s SELECT list that ``view`` sees hidden: asked from the server as NULL."""
    return [h for h in st.hidden_outputs if action_for(h.column, view.grant(h.column)) is Action.NULL]


def _nulled_refusal(stmt: StatementCrypto, view: RoleView) -> ProxyError | None:
    """A prepared statement whose text asks for a column as NULL, under a view that no longer hides it:
    its rows cannot show the column, so it must be prepared again (the server keeps the text)."""
    for column in stmt.nulled:
        if action_for(column, view.grant(column)) is not Action.NULL:
            e = _unconfirmed(
                f"the prepared statement was prepared while column {column.column_id} was hidden from this role, "
                "and the visibility policy has changed since",
                hint="prepare the statement again",
            )
            e.reason = RefusalReason.POLICY_DENIED
            return e
    return None


def _hinted(cc: ColumnCrypto | None, f: m.FieldDescription) -> ColumnCrypto | None:
    """The analysis's column for a result field the RowDescription does not attribute: an encrypted
    column's values arrive as bytea (anything else is not its stored value), a plain column's whatever
    their type (restricting a value that is not the column's is harmless)."""
    if cc is None or (cc.column.encrypted and f.type_oid != BYTEA_OID):
        return None
    return cc


def _first(pair: tuple[int, bytes]) -> int:
    return pair[0]


def _is_utf8(fmt: SessionFormat) -> bool:
    """Whether the client's bytes are UTF-8 (no conversion); False also for an unsupported encoding,
    which then takes the codecs' own path and its error."""
    try:
        return python_codec(fmt.client_encoding) is None
    except ProxyError:
        return False


def _row_description_count(body: bytes) -> int:
    (n,) = _I16.unpack_from(body, 0)
    return int(n)


_OID_CODECS: dict[int, TypeCodec | None] = {}
_OID_NAMES = {
    16: "bool", 17: "bytea", 20: "int8", 21: "int2", 23: "int4", 25: "text", 114: "json", 700: "float4",
    701: "float8", 1042: "char", 1043: "varchar", 1082: "date", 1114: "timestamp", 1184: "timestamptz",
    1700: "numeric", 2950: "uuid", 3802: "jsonb",
}  # fmt: skip


def _codec_by_oid(oid: int) -> TypeCodec | None:
    if oid not in _OID_CODECS:
        name = _OID_NAMES.get(oid)
        _OID_CODECS[oid] = codec_for(name) if name else None
    return _OID_CODECS[oid]


def _copies_in_protected(st: StatementPlan) -> bool:
    return st.copy is not None and st.copy.direction is CopyDirection.FROM and st.copy.needs_rewrite


def _governed_columns(cp: CopyPlan) -> tuple[ProtectedColumn | None, ...]:
    """Every governed column of a COPY in wire order (encrypted and plain)."""
    return cp.governed_columns


def _copy_current_statement(state: object) -> StatementPlan | None:
    if isinstance(state, QueryCrypto):
        return state.statements[state.index] if state.index < len(state.statements) else None
    if isinstance(state, PortalCrypto) and state.statement is not None:
        return state.statement.plan
    return None


class CopyTransforms:
    """The per-field callbacks of a COPY of a protected table (text and CSV formats)."""

    def __init__(self, crypto: SessionCrypto) -> None:
        self.crypto = crypto
        self.row_subject: Subject | None = None  # the current row's data subject (per-subject keys)
        self._subject_problem: str | None = None

    def subject_reader(self, table: str, subject: SubjectColumn) -> Callable[[bytes | None], None]:
        """The rewriter's ``row_field`` callback: reads each row's subject id before its fields are sealed."""

        def read(value: bytes | None) -> None:
            self.row_subject = None if value is None else subject_from_text(table, subject, value)
            self._subject_problem = (
                f"pgveil: the subject id for column {subject.column} of {table} is NULL, so the row has no data "
                "subject to encrypt it for"
                if value is None
                else None
            )

        return read

    def sealer(self, cc: ColumnCrypto) -> Callable[[bytes], bytes]:
        crypto = self.crypto
        subject_keyed = cc.column.subject_kind is not None

        def seal_field(plaintext: bytes) -> bytes:
            canonical = crypto._canonical_text(cc, plaintext)
            if subject_keyed and self.row_subject is None:
                raise InvalidSubject(
                    self._subject_problem or f"pgveil: no data subject for column {cc.column.column_id}"
                )
            envelope = crypto.ctx.seal(cc, canonical, self.row_subject)
            crypto.values_encrypted += 1
            return b"\\x" + envelope.hex().encode("ascii")

        return seal_field

    def envelope_checker(self, cc: ColumnCrypto) -> Callable[[bytes], bytes]:
        """A ciphertext role's field: the stored envelope in bytea text form, checked to be an envelope
        of this column, and passed on as it came (in hex form), never sealed again."""
        crypto = self.crypto

        def lookup(key_id: bytes) -> DataKey | None:
            try:
                return crypto.ctx.keys.by_id(key_id)
            except KeyMiss:
                return None  # a miss half-way through a COPY stream cannot be retried: it fails

        def check_field(stored: bytes) -> bytes:
            envelope = crypto._bytea_value(cc, stored)
            crypto.ctx.check_envelope(cc, envelope, lookup, self.row_subject)
            return b"\\x" + envelope.hex().encode("ascii")

        return check_field

    def opener(self, out: ColumnOutput) -> Callable[[bytes], bytes | None]:
        crypto = self.crypto

        def open_field(stored: bytes) -> bytes | None:
            def lookup(key_id: bytes) -> DataKey | None:
                try:
                    return crypto.ctx.keys.by_id(key_id)
                except KeyMiss:
                    return None  # a miss half-way through a COPY stream cannot be retried: it fails

            try:
                return rewrite_value_text(stored, out, lookup, crypto.fmt)
            except RowDecryptError as e:
                crypto.decrypt_failures += 1
                log.warning("a value of column %s could not be decrypted: %s", e.column.column_id, e.reason)
                raise DecryptionError(
                    f"pgveil: a value of column {e.column.column_id} could not be decrypted"
                ) from None

        return open_field
