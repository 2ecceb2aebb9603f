"""Access audit: who read how many values of which governed column, and in what form; and the anomaly
rules that flag (and optionally stop) a role reading too much plaintext.

Theory of operation. The per-session encryption object already counts, per result column and row (per
batch of DataRows, per COPY stream, never per value), the values it serves by (policy role label,
``schema.table.column``, outcome: plaintext, masked, hidden, ciphertext). Its counts are handed here at
the end of every statement (ReadyForQuery) and about once a second by the listener, through one
:class:`SessionAudit` per session, into the process's :class:`AccessAudit`:

* the *period totals* by (session id, login role, policy role, column, outcome), drained by
  :meth:`AccessAudit.drain` every ``audit.flush_seconds`` (and at session end and shutdown) into
  :class:`AuditRecord` rows, which ``proxy.audit_runtime`` writes to the keystore and the audit log;
* the *anomaly windows*: for every (anomaly rule, governed column it covers), the plaintext values read
  by sessions the rule applies to, in a sliding window of ``audit.window_seconds`` counted in
  :data:`BUCKETS` buckets. Reading more than the rule's rate (``plaintext_per_minute``, scaled to the
  window) raises the anomaly; it stays raised until a whole window has passed since the limit was last
  exceeded. While a ``refuse: true`` rule's anomaly is raised, :meth:`SessionAudit.refusal` refuses a
  statement that would serve that column in plaintext to a session of that role (SQLSTATE 53400): the
  decision is made per statement, before the server runs it.

A rule applies to a session whose login role is the rule's role or is a member of it (the policy roles
its view combines, see ``proxy.policy.rules.PolicyView.roles``); ``default`` applies to sessions whose
label is ``default``. Within one role the most specific pattern that covers a column decides, as in
``roles:``. Windows are in this process's memory: each instance (and each worker process) counts its
own sessions only.

Pure: no I/O and no asyncio; both clocks are injectable (``clock``: monotonic seconds for windows,
``wall``: epoch seconds for the periods). Never holds or logs a value, literal or parameter: only
names of roles and columns, and counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.config.types import AnomalyRule
from proxy.errors import ProxyError, RefusalReason
from proxy.policy.model import RoleView, Visibility
from proxy.rewrite.catalog import ProtectedColumn

OUTCOMES: Final = ("plaintext", "masked", "hidden", "ciphertext")
PLAINTEXT: Final = "plaintext"
BUCKETS: Final = 12  # a window is counted in twelfths: the sliding sum is exact to one bucket
# (policy role label, column id, outcome) -> values: what a session's encryption object counts.
ReadCounts = dict[tuple[str, str, str], int]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of ``pgveil.access_audit`` and one line of the audit log (never a value)."""

    session_id: int
    login_role: str
    policy_role: str  # the label of the session's view: the policy role its grants are counted under
    column: str  # schema.table.column
    outcome: str  # plaintext, masked, hidden, ciphertext
    count: int
    period_start: float  # epoch seconds
    period_end: float


@dataclass(frozen=True, slots=True)
class AnomalyStarted:
    role: str
    column: str
    limit: int  # plaintext values per minute
    window_seconds: float
    read: int  # plaintext values read in the window when the limit was exceeded
    refuse: bool


@dataclass(frozen=True, slots=True)
class AnomalyEnded:
    role: str
    column: str


AnomalyEvent = AnomalyStarted | AnomalyEnded


class AnomalyRefused(ProxyError):
    """A statement that would serve a column in plaintext to a role whose anomaly rule is raised."""

    sqlstate = "53400"  # configuration_limit_exceeded
    reason = RefusalReason.AUDIT_ANOMALY


class _Window:
    """Plaintext values read in the last ``BUCKETS`` buckets, and whether the anomaly is raised."""

    __slots__ = ("active_until", "counts", "indexes")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.indexes = [-1] * BUCKETS  # the bucket number each slot currently counts
        self.active_until: float | None = None  # raised until then (monotonic seconds)

    def add(self, index: int, n: int) -> int:
        """Adds ``n`` in bucket ``index``; the sum over the window that ends with it."""
        slot = index % BUCKETS
        if self.indexes[slot] != index:
            self.indexes[slot] = index
            self.counts[slot] = 0
        self.counts[slot] += n
        oldest = index - BUCKETS
        return sum(c for c, i in zip(self.counts, self.indexes, strict=True) if i > oldest)


class AccessAudit:
    """The process's audit totals and anomaly windows (see the module docstring)."""

    def __init__(
        self,
        rules: Sequence[AnomalyRule] = (),
        column_ids: Iterable[str] = (),
        *,
        window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        self.rules = tuple(rules)
        self.window_seconds = float(window_seconds)
        self._bucket = self.window_seconds / BUCKETS
        self._clock = clock
        self._wall = wall
        # column id -> the rules that decide it, one per role (the most specific pattern of that role)
        self._rules_by_column: dict[str, tuple[AnomalyRule, ...]] = {}
        for column_id in column_ids:
            best: dict[str, AnomalyRule] = {}
            for rule in self.rules:
                pattern = rule.pattern
                if not pattern.covers(column_id):
                    continue
                held = best.get(rule.role)
                if held is None or pattern.specificity > held.pattern.specificity:
                    best[rule.role] = rule
            if best:
                self._rules_by_column[column_id] = tuple(best[r] for r in sorted(best))
        self._windows: dict[tuple[str, str], _Window] = {}  # (rule role, column id)
        self._active: set[tuple[str, str]] = set()
        self.refusing = 0  # raised anomalies of refusing rules: the fast path of refusal() when 0
        self.totals: dict[tuple[int, str, str, str, str], int] = {}
        self.period_start = wall()
        self.unexported: ReadCounts = {}  # for the metrics, drained by the runtime
        self.events: list[AnomalyEvent] = []  # drained by the runtime (log lines, metrics)

    @property
    def watched_columns(self) -> frozenset[str]:
        return frozenset(self._rules_by_column)

    # -- counting ---------------------------------------------------------------------------------------
    def record(
        self, session_id: int, login_role: str, roles: frozenset[str], counts: Mapping[tuple[str, str, str], int]
    ) -> None:
        """Adds one session's counts since its last call; ``roles`` are the policy roles its view
        combines (its label included), which decide the anomaly rules that apply."""
        totals, unexported = self.totals, self.unexported
        now: float | None = None
        for key, n in counts.items():
            if n <= 0:
                continue
            label, column_id, outcome = key
            tkey = (session_id, login_role, label, column_id, outcome)
            totals[tkey] = totals.get(tkey, 0) + n
            unexported[key] = unexported.get(key, 0) + n
            if outcome != PLAINTEXT:
                continue
            rules = self._rules_by_column.get(column_id)
            if rules is None:
                continue
            for rule in rules:
                if rule.role in roles:
                    if now is None:
                        now = self._clock()
                    self._count(rule, column_id, n, now)

    def _count(self, rule: AnomalyRule, column_id: str, n: int, now: float) -> None:
        wkey = (rule.role, column_id)
        window = self._windows.get(wkey)
        if window is None:
            window = self._windows[wkey] = _Window()
        read = window.add(int(now // self._bucket), n)
        if read * 60 <= rule.plaintext_per_minute * self.window_seconds:
            return
        raised = window.active_until is not None and now < window.active_until
        window.active_until = now + self.window_seconds
        if raised:
            return
        self._active.add(wkey)
        if rule.refuse:
            self.refusing += 1
        self.events.append(
            AnomalyStarted(rule.role, column_id, rule.plaintext_per_minute, self.window_seconds, read, rule.refuse)
        )

    def tick(self) -> None:
        """Lowers the anomalies whose window has passed (an AnomalyEnded event each)."""
        if not self._active:
            return
        now = self._clock()
        for wkey in sorted(self._active):
            window = self._windows[wkey]
            if window.active_until is not None and now >= window.active_until:
                window.active_until = None
                self._active.discard(wkey)
                if self._refuses(wkey):
                    self.refusing -= 1
                self.events.append(AnomalyEnded(*wkey))

    def _refuses(self, wkey: tuple[str, str]) -> bool:
        role, column_id = wkey
        return any(r.role == role and r.refuse for r in self._rules_by_column.get(column_id, ()))

    def active(self, role: str, column_id: str) -> bool:
        window = self._windows.get((role, column_id))
        return window is not None and window.active_until is not None and self._clock() < window.active_until

    def refused_rule(self, roles: frozenset[str], column_ids: Iterable[str]) -> tuple[AnomalyRule, str] | None:
        """The refusing rule (and column) that stops a statement serving ``column_ids`` in plaintext to
        a session of ``roles``, or None."""
        if not self.refusing:
            return None
        for column_id in column_ids:
            for rule in self._rules_by_column.get(column_id, ()):
                if rule.refuse and rule.role in roles and self.active(rule.role, column_id):
                    return rule, column_id
        return None

    # -- periods ----------------------------------------------------------------------------------------
    def drain(self) -> list[AuditRecord]:
        """The records of the period since the last drain (in a stable order); starts the next one."""
        start, end = self.period_start, self._wall()
        totals, self.totals = self.totals, {}
        self.period_start = end
        return [
            AuditRecord(sid, login, label, column, outcome, n, start, end)
            for (sid, login, label, column, outcome), n in sorted(totals.items())
        ]

    def session(self, session_id: int, login_role: str) -> SessionAudit:
        return SessionAudit(self, session_id, login_role)


def view_roles(view: RoleView) -> frozenset[str]:
    """The policy roles a view combines, its label included (``PolicyView.roles``; other views: the label)."""
    roles = getattr(view, "roles", None)
    label = view.label
    if isinstance(roles, frozenset):
        return roles | {label}
    return frozenset({label})


class SessionAudit:
    """One session's seam to the process's audit: the statement-time refusal and the hand-over of its
    counts. Its login role and session id go into every record."""

    __slots__ = ("_roles", "_view", "audit", "login_role", "session_id")

    def __init__(self, audit: AccessAudit, session_id: int, login_role: str) -> None:
        self.audit = audit
        self.session_id = session_id
        self.login_role = login_role
        self._roles: frozenset[str] | None = None  # of the last view a statement was decided under
        self._view: RoleView | None = None

    @property
    def refusing(self) -> bool:
        """Whether any refusing anomaly is raised (then prepared statements are decided again)."""
        return self.audit.refusing > 0

    def refusal(self, view: RoleView, columns: Iterable[ProtectedColumn]) -> ProxyError | None:
        """At statement decision time: the refusal of a statement that outputs ``columns`` under
        ``view``, if a refusing anomaly rule of the session's roles is raised for one served in plaintext."""
        if view is not self._view:
            self._view = view
            self._roles = view_roles(view)
        roles = self._roles
        assert roles is not None
        if not self.audit.refusing:
            return None
        plaintext = [c.column_id for c in columns if view.grant(c).visibility is Visibility.PLAINTEXT]
        hit = self.audit.refused_rule(roles, plaintext)
        if hit is None:
            return None
        rule, column_id = hit
        window = self.audit.window_seconds
        return AnomalyRefused(
            f"pgveil: plaintext reads of column {column_id} by role {rule.role} are refused for now: more than "
            f"{rule.plaintext_per_minute} values per minute were read (audit anomaly rule, window {window:g} s)",
            hint=f"the refusal ends when {window:g} s have passed without the limit being exceeded",
        )

    def take(self, counts: ReadCounts) -> None:
        """Hands over (and clears) the session's counts since the last call."""
        if not counts:
            return
        roles = self._roles
        if roles is None:
            roles = frozenset(label for label, _, _ in counts)
        self.audit.record(self.session_id, self.login_role, roles, counts)
        counts.clear()
