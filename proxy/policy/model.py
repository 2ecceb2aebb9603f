"""The vocabulary of visibility policy, shared by the config parser, the SQL analysis, the per-session
encryption object and the CLI.

A *governed* column is any column listed under ``tables:`` in the config: encrypted (``encrypt: true``,
``bytea`` in the database) or plain (visibility only). A role's view of each governed column is one
:class:`Grant`; the SQL analysis records every :class:`Reference` a statement makes to a governed column,
and :func:`proxy.policy.decide.decide` refuses what the role's grants do not allow.

Must not: do I/O, import the protocol layer, or hold values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

from proxy.rewrite.catalog import ProtectedColumn


class Visibility(StrEnum):
    """What a role gets for a column, most permissive first (grant combination keeps the first)."""

    PLAINTEXT = "plaintext"  # the value
    MATCH = "match"  # masked in results; usable in equality once the column is searchable (else = masked)
    MASKED = "masked"  # a masking function's output, of the declared type (or NULL where none exists)
    CIPHERTEXT = "ciphertext"  # the stored envelope as bytea (encrypted columns); plain columns as stored
    HIDDEN = "hidden"  # NULL; an encrypted value is never decrypted
    DENY = "deny"  # any statement that references the column is refused


class MaskFunction(StrEnum):
    """Masking functions, most revealing first (combination of two masked grants keeps the first)."""

    LAST4 = "last4"
    EMAIL = "email"
    PARTIAL = "partial"
    HASH = "hash"
    FIXED = "fixed"
    NULL = "null"


@dataclass(frozen=True, slots=True)
class Mask:
    function: MaskFunction
    text: str | None = None  # the argument of ``fixed:<text>``; None for every other function

    def __str__(self) -> str:
        return f"{self.function}:{self.text}" if self.function is MaskFunction.FIXED else str(self.function)


@dataclass(frozen=True, slots=True)
class Grant:
    """One role's view of one column. ``mask`` is set exactly when ``visibility`` is MASKED or MATCH.
    ``source`` says where it came from, for ``policy explain`` and refusal hints: the policy role and
    pattern (``"support: public.customers.ssn"``) or ``"default"``."""

    visibility: Visibility
    mask: Mask | None = None
    source: str = "default"


class ReferenceKind(Enum):
    OUTPUT = "output"  # the stored value passes unchanged into a result column (SELECT list, RETURNING, COPY TO)
    WRITE = "write"  # a value is assigned to the column (INSERT, UPDATE SET, COPY FROM)
    EQUALITY = "equality"  # col = x, col IN (...), col = ANY(...): what ``match`` will allow once searchable
    EXPRESSION = "expression"  # anything else: predicates, ordering, grouping, joins, functions, IS NULL, ...


@dataclass(frozen=True, slots=True)
class Reference:
    """One use of a governed column in a statement. ``construct`` names it for the refusal message
    (``"WHERE"``, ``"ORDER BY"``, ``"LIKE"``, ``"lower()"``, ``"SELECT *"``, ``"whole-row reference"``)."""

    column: ProtectedColumn
    kind: ReferenceKind
    construct: str


class RoleView(Protocol):
    """A login role's view of every governed column, computed once per (login role, policy version).

    ``label`` is the metric label for the role: a role name that appears in the policy, or ``"default"``
    (never an arbitrary login name: labels stay bounded)."""

    @property
    def login_role(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    @property
    def label(self) -> str: ...

    def grant(self, column: ProtectedColumn) -> Grant: ...
