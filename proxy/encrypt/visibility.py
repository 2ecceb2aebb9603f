"""The login role's view applied by the per-session encryption object: which action each governed result
column gets (:class:`~proxy.encrypt.rows.Action`), how its RowDescription field and its result format
look, and what a write by the role means. Decided once per statement (or per result), never per row.

What each grant gives (the lead's design for issue 8):

==============  ============================================  ==========================================
grant           encrypted column                              plain column
==============  ============================================  ==========================================
plaintext       decrypt; declared type                        the server's bytes, untouched
masked, match   decrypt, mask, encode; declared type          decode, mask, encode; the server's type
hidden          NULL, nothing decrypted; declared type        NULL; the server's type
ciphertext      the stored envelope; ``bytea``                the server's bytes, untouched
deny            never reaches a result (the decision refuses the statement)
==============  ============================================  ==========================================

An encrypted column that is decrypted, masked or hidden is asked from the server in binary (the raw
envelope); one served as ciphertext, and every plain column, in the format the client asked for, so the
bytes can go on as they are.

Must not: do I/O, hold values, or log anything about them.
"""

from __future__ import annotations

from proxy.encrypt.rows import Action
from proxy.errors import ProxyError, RefusalReason
from proxy.policy.decide import PolicyDenied as PolicyDenied
from proxy.policy.decide import decide as decide
from proxy.policy.model import Grant, Visibility
from proxy.rewrite.catalog import ProtectedColumn

# The outcome label of each visibility, for pgveil_values_served_total (``match`` is served masked).
OUTCOMES: dict[Visibility, str] = {
    Visibility.PLAINTEXT: "plaintext",
    Visibility.MATCH: "masked",
    Visibility.MASKED: "masked",
    Visibility.HIDDEN: "hidden",
    Visibility.CIPHERTEXT: "ciphertext",
    Visibility.DENY: "hidden",
}


class UniformView:
    """A :class:`~proxy.policy.model.RoleView` that gives every governed column one grant: for tests, and
    for a session made without a policy (the runtime always passes the login role's view)."""

    __slots__ = ("_epoch", "_grant", "_label", "_login_role")

    def __init__(self, grant: Grant, *, login_role: str = "", epoch: int = 0, label: str = "default") -> None:
        self._grant = grant
        self._login_role = login_role
        self._epoch = epoch
        self._label = label

    @property
    def login_role(self) -> str:
        return self._login_role

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def label(self) -> str:
        return self._label

    def grant(self, column: ProtectedColumn) -> Grant:
        return self._grant


PLAINTEXT_VIEW = UniformView(Grant(Visibility.PLAINTEXT))


class MaskKeyMissing(ProxyError):
    """A ``hash`` mask applies, and no keystore is configured to hold its key."""

    sqlstate = "55000"
    reason = RefusalReason.KEY_UNAVAILABLE


def action_for(column: ProtectedColumn, grant: Grant) -> Action:
    """The row action of a result column that carries ``column``'s values."""
    v = grant.visibility
    if column.encrypted:
        if v is Visibility.PLAINTEXT:
            return Action.DECRYPT
        if v in (Visibility.MASKED, Visibility.MATCH):
            return Action.MASK
        if v is Visibility.CIPHERTEXT:
            return Action.STORED
        return Action.NULL  # hidden; deny never gets here (refused), and would be hidden if it did
    if v in (Visibility.PLAINTEXT, Visibility.CIPHERTEXT):
        return Action.STORED
    if v in (Visibility.MASKED, Visibility.MATCH):
        return Action.DECODE_MASK
    return Action.NULL


def server_binary_for(column: ProtectedColumn, action: Action, client_binary: bool) -> bool:
    """The result format pgveil asks the server for: the raw envelope for what it opens or hides, the
    client's own format for what it passes on or decodes."""
    if column.encrypted and action is not Action.STORED:
        return True
    return client_binary


def presents_declared_type(column: ProtectedColumn, action: Action) -> bool:
    """Whether the RowDescription field shows the declared type (else the server's field as it is)."""
    return column.encrypted and action is not Action.STORED


def writes_envelopes(column: ProtectedColumn, grant: Grant) -> bool:
    """A ciphertext role writes an encrypted column's stored form: envelopes, checked and passed on."""
    return column.encrypted and grant.visibility is Visibility.CIPHERTEXT
