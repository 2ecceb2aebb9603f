"""The per-statement decision: may this login role run a statement that makes these references to
governed columns? Decided once per statement (and per policy epoch), never per row.

The rules, for every :class:`~proxy.policy.model.Reference`, with the role's grant for its column:

* ``deny`` refuses the statement, whatever the kind of reference (an output through ``SELECT *``
  and a write included): the column must not be touched at all;
* an ``EXPRESSION`` or ``EQUALITY`` reference needs ``plaintext``: a predicate, an ordering, a grouping,
  a join or a function over a column the role does not see would be an oracle for its values
  (``WHERE ssn LIKE '1%'``). ``match`` will allow equality once the column is searchable; until then
  it is refused like ``masked``;
* ``OUTPUT`` is allowed: the result serves the value, a mask, NULL or the ciphertext, per the grant;
* ``WRITE`` is allowed: a role may write a column it may not read.

A refusal is a :class:`PolicyDenied` (SQLSTATE 42501) naming the column, the construct and what the
role sees; ``deny`` is reported before any other refusal of the same statement.

Must not: do I/O, or put a value in any message (references carry none).
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.errors import ProxyError, RefusalReason
from proxy.policy.model import Grant, Reference, ReferenceKind, RoleView, Visibility

_NEEDS_PLAINTEXT = (ReferenceKind.EXPRESSION, ReferenceKind.EQUALITY)


class PolicyDenied(ProxyError):
    """The login role's policy does not allow a use of a governed column: ``insufficient_privilege``,
    the SQLSTATE PostgreSQL itself gives a missing column privilege."""

    sqlstate = "42501"
    reason = RefusalReason.POLICY_DENIED


def decide(references: Iterable[Reference], view: RoleView) -> ProxyError | None:
    """None if the role may run the statement, else the error to answer it with."""
    first_refused: tuple[Reference, Grant] | None = None
    for ref in references:
        grant = view.grant(ref.column)
        if grant.visibility is Visibility.DENY:
            return _denied(ref, grant, view)
        if first_refused is None and ref.kind in _NEEDS_PLAINTEXT and grant.visibility is not Visibility.PLAINTEXT:
            first_refused = (ref, grant)
    if first_refused is not None:
        return _needs_plaintext(*first_refused, view)
    return None


def _column_name(ref: Reference) -> str:
    c = ref.column
    named = f"{c.schema}.{c.table}.{c.name}"
    # A partition's, child's or view's column: name the configured column its grant is for, too.
    return named if named == c.column_id else f"{named} (of {c.column_id})"


def _hint(grant: Grant) -> str:
    return f"the grant comes from the pgveil policy: {grant.source}"


def _denied(ref: Reference, grant: Grant, view: RoleView) -> PolicyDenied:
    return PolicyDenied(
        f"pgveil: permission denied for column {_column_name(ref)}: the column is denied to role "
        f"{view.login_role} ({ref.construct})",
        hint=_hint(grant),
    )


def _needs_plaintext(ref: Reference, grant: Grant, view: RoleView) -> PolicyDenied:
    sees = {
        Visibility.MATCH: "masked",
        Visibility.MASKED: "masked",
        Visibility.CIPHERTEXT: "as ciphertext",
        Visibility.HIDDEN: "hidden",
    }[grant.visibility]
    why = ""
    if grant.visibility is Visibility.MATCH and ref.kind is ReferenceKind.EQUALITY:
        why = "; match allows equality only on a searchable column"
    return PolicyDenied(
        f"pgveil: permission denied for column {_column_name(ref)}: {ref.construct} needs plaintext access "
        f"(role {view.login_role} sees it {sees}{why})",
        hint=_hint(grant),
    )
