"""The visibility policy as data: per policy role its grants by column pattern, the default grant, and
the combination of a login role's grants into one :class:`PolicyView` (a ``RoleView``).

Theory of operation. The ``roles:`` section of the config becomes a :class:`Policy` (``proxy.config``
parses and validates it; :func:`parse_pattern` and :func:`parse_visibility` read its two kinds of text).
For a login role, the roles it is a member of (resolved elsewhere, from ``pg_auth_members``) and an
epoch (bumped by the runtime on every reload), :meth:`Policy.view` precomputes the grant of every
governed column:

* within one policy role the most specific pattern that covers the column wins
  (``schema.table.column`` > ``schema.table.*`` > ``schema.*`` > ``*``);
* across the login role and its roles the most permissive of their grants wins (``Visibility`` order,
  then ``MaskFunction`` order), as PostgreSQL privileges combine;
* only when none of those roles covers the column does the policy's default apply.

A :class:`Policy` is immutable, hashable and independent of the epoch, so two loads of the same file
compare equal and a reload that changes nothing need not disturb a session.

Must not: do I/O, know about sessions, SQL or values.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Final

from proxy.policy.model import Grant, Mask, MaskFunction, Visibility
from proxy.rewrite.catalog import ProtectedColumn

DEFAULT_KEY: Final = "default"  # the reserved key of ``roles:``: the grant no role covers
DEFAULT_LABEL: Final = "default"  # the metric label of a login role the policy does not name
WILDCARD: Final = "*"
RESTRICTIVE_DEFAULT: Final = Grant(Visibility.HIDDEN, source=DEFAULT_KEY)  # the default of an absent ``roles:``

# How the documentation and error messages list the accepted texts.
VISIBILITY_FORMS: Final = (
    "plaintext",
    "match",
    "match:<function>",
    "masked:<function>",
    "hidden",
    "ciphertext",
    "deny",
)
MASK_FORMS: Final = ("last4", "partial", "email", "hash", "fixed:<text>", "null")
DEFAULT_MATCH_MASK: Final = Mask(MaskFunction.PARTIAL)  # ``match`` without a function

_VISIBILITY_RANK: Final = {v: i for i, v in enumerate(Visibility)}
_MASK_RANK: Final = {f: i for i, f in enumerate(MaskFunction)}
_WITH_MASK: Final = (Visibility.MATCH, Visibility.MASKED)
# Names as the config's tables: unquoted identifiers, folded to lower case, at most NAMEDATALEN - 1 bytes.
_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_$]*\Z")


class Specificity(IntEnum):
    """How narrowly a pattern names columns; within one role the highest that covers a column wins."""

    EVERYTHING = 0  # *
    SCHEMA = 1  # schema.*
    TABLE = 2  # schema.table.*
    COLUMN = 3  # schema.table.column


@dataclass(frozen=True, slots=True)
class Pattern:
    """A column pattern. ``None`` parts are the wildcard: ``table`` None means every table of ``schema``
    (or of every schema, with ``schema`` None too); ``column`` None means every column of the table."""

    schema: str | None = None
    table: str | None = None
    column: str | None = None

    @property
    def specificity(self) -> Specificity:
        if self.column is not None:
            return Specificity.COLUMN
        if self.table is not None:
            return Specificity.TABLE
        return Specificity.SCHEMA if self.schema is not None else Specificity.EVERYTHING

    def covers(self, column_id: str) -> bool:
        """Whether the pattern names the column ``schema.table.column``."""
        schema, table, column = _split_column_id(column_id)
        return (
            (self.schema is None or self.schema == schema)
            and (self.table is None or self.table == table)
            and (self.column is None or self.column == column)
        )

    def __str__(self) -> str:
        named = [p for p in (self.schema, self.table, self.column) if p is not None]
        return ".".join(named) if self.column is not None else ".".join([*named, WILDCARD])


def _split_column_id(column_id: str) -> tuple[str, str, str]:
    # Configured names match [a-z_][a-z0-9_$]*, so a column id has exactly two dots.
    schema, _, rest = column_id.partition(".")
    table, _, column = rest.partition(".")
    return schema, table, column


def parse_pattern(text: str) -> Pattern:
    """``schema.table.column``, ``schema.table.*``, ``schema.*`` or ``*``; names fold to lower case as
    unquoted SQL identifiers do. Raises ``ValueError`` with a message that completes ``<path>: ``."""
    parts = [p.strip().lower() for p in text.split(".")]
    shape = "a pattern must be schema.table.column, schema.table.*, schema.* or *"
    if WILDCARD in parts[:-1] or len(parts) > 3 or not all(parts):
        raise ValueError(f"{shape}, got {text!r}")
    names, star = (parts[:-1], True) if parts[-1] == WILDCARD else (parts, False)
    if not star and len(names) != 3:
        raise ValueError(f"{shape}, got {text!r}")
    for name in names:
        if not _is_identifier(name):
            raise ValueError(f"{shape}, each name matching [a-z_][a-z0-9_$]* and at most 63 bytes, got {text!r}")
    padded = [*names, None, None, None]
    return Pattern(schema=padded[0], table=padded[1], column=padded[2])


def _is_identifier(name: str) -> bool:
    return _IDENTIFIER.match(name) is not None and len(name.encode()) <= 63


def parse_visibility(text: str) -> tuple[Visibility, Mask | None]:
    """One visibility string (``plaintext``, ``match``, ``match:<fn>``, ``masked:<fn>``, ``hidden``,
    ``ciphertext``, ``deny``; ``<fn>`` one of ``last4``, ``partial``, ``email``, ``hash``,
    ``fixed:<text>``, ``null``). Keywords are case-insensitive; a ``fixed:`` text is kept as written.
    Raises ``ValueError`` with a message that completes ``<path>: `` (with a did-you-mean)."""
    keyword, sep, argument = text.lstrip().partition(":")  # a fixed: text keeps its trailing spaces
    keyword = keyword.strip().lower()
    try:
        visibility = Visibility(keyword)
    except ValueError:
        raise ValueError(
            f"unknown visibility {_quote(text)}; expected one of {', '.join(VISIBILITY_FORMS)}"
            + _suggest(keyword, [v.value for v in Visibility], rest=f"{sep}{argument}")
        ) from None
    if visibility not in _WITH_MASK:
        if sep:
            raise ValueError(f"{keyword} takes no function, got {_quote(text)}")
        return visibility, None
    if not sep:
        if visibility is Visibility.MATCH:
            return visibility, DEFAULT_MATCH_MASK
        raise ValueError(f"masked needs a function: masked:<function>, the function one of {', '.join(MASK_FORMS)}")
    return visibility, parse_mask(argument)


def parse_mask(text: str) -> Mask:
    """``last4``, ``partial``, ``email``, ``hash``, ``fixed:<text>`` or ``null``. Raises ``ValueError``."""
    name, sep, argument = text.partition(":")
    name = name.strip().lower()
    try:
        function = MaskFunction(name)
    except ValueError:
        raise ValueError(
            f"unknown mask function {_quote(name)}; expected one of {', '.join(MASK_FORMS)}"
            + _suggest(name, [f.value for f in MaskFunction], rest=f"{sep}{argument}")
        ) from None
    if function is MaskFunction.FIXED:
        if not sep:
            raise ValueError("mask fixed needs its text: fixed:<text>")
        return Mask(function, argument)
    if sep:
        raise ValueError(f"mask {function} takes no text, got {_quote(text)}")
    return Mask(function)


def _quote(text: str) -> str:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return '"' + shown.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _suggest(word: str, choices: list[str], *, rest: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}{rest}'?)" if close else ""


def make_grant(visibility: Visibility, mask: Mask | None, source: str) -> Grant:
    """A Grant with the model's invariant: ``mask`` set exactly for MATCH and MASKED."""
    if (mask is not None) != (visibility in _WITH_MASK):
        raise ValueError(f"{visibility} {'needs' if mask is None else 'takes no'} mask")
    return Grant(visibility, mask, source)


def permissiveness(grant: Grant) -> tuple[int, int, str]:
    """Sort key: the most permissive grant first (Visibility order, then MaskFunction order; two
    ``fixed`` masks by their text, so that the combination does not depend on the order of roles)."""
    mask = grant.mask
    return (
        _VISIBILITY_RANK[grant.visibility],
        _MASK_RANK[mask.function] if mask is not None else -1,
        (mask.text or "") if mask is not None else "",
    )


def most_permissive(grants: Iterable[Grant]) -> Grant | None:
    return min(grants, key=permissiveness, default=None)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``pattern: visibility`` line of one policy role."""

    pattern: Pattern
    grant: Grant


@dataclass(frozen=True, slots=True)
class RoleRules:
    """A policy role's rules, most specific first (at most one per pattern)."""

    role: str
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.rules, key=lambda r: (-r.pattern.specificity, str(r.pattern))))
        if len({r.pattern for r in ordered}) != len(ordered):
            raise ValueError(f"role {self.role}: a pattern is listed twice")
        object.__setattr__(self, "rules", ordered)

    def rule_for(self, column_id: str) -> Rule | None:
        """The most specific rule that covers the column, or None."""
        return next((r for r in self.rules if r.pattern.covers(column_id)), None)


def _no_grants() -> Mapping[str, Mapping[str, Grant]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Policy:
    """Who sees what, epoch-independent and hashable.

    ``roles``: the policy roles by name (sorted). ``default``: the grant of a (role set, column) that no
    role of the set covers. ``column_ids``: the governed columns, whose grants a view precomputes.
    ``configured``: whether the config had a ``roles:`` section (absent means ``default: hidden``).
    """

    roles: tuple[RoleRules, ...] = ()
    default: Grant = RESTRICTIVE_DEFAULT
    column_ids: frozenset[str] = frozenset()
    configured: bool = False
    # role -> column_id -> the role's own grant for that column (only the columns it covers)
    _by_role: Mapping[str, Mapping[str, Grant]] = field(
        default_factory=_no_grants, init=False, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.roles, key=lambda r: r.role))
        if len({r.role for r in ordered}) != len(ordered):
            raise ValueError("a policy role is listed twice")
        object.__setattr__(self, "roles", ordered)
        by_role: dict[str, Mapping[str, Grant]] = {}
        for rr in ordered:
            own: dict[str, Grant] = {}
            for column_id in self.column_ids:
                rule = rr.rule_for(column_id)
                if rule is not None:
                    own[column_id] = rule.grant
            by_role[rr.role] = MappingProxyType(own)
        object.__setattr__(self, "_by_role", MappingProxyType(by_role))

    @property
    def role_names(self) -> frozenset[str]:
        """The PostgreSQL roles the policy names (metric labels come only from these)."""
        return frozenset(r.role for r in self.roles)

    @property
    def masks(self) -> frozenset[Mask]:
        """Every mask a grant of the policy uses (the default's included)."""
        grants = [self.default, *(rule.grant for rr in self.roles for rule in rr.rules)]
        return frozenset(g.mask for g in grants if g.mask is not None)

    def resolve(self, column_id: str, roles: Iterable[str]) -> Grant:
        """The combined grant of ``roles`` (policy role names or not) for one column."""
        by_role = self._by_role
        candidates: list[Grant] = []
        for role in roles:
            own = by_role.get(role)
            if own is None:
                continue
            if column_id in own:
                candidates.append(own[column_id])
            elif column_id not in self.column_ids:
                # A column the policy was not built for: read the role's rules directly.
                rr = next(r for r in self.roles if r.role == role)
                rule = rr.rule_for(column_id)
                if rule is not None:
                    candidates.append(rule.grant)
        return most_permissive(candidates) or self.default

    def view(self, login_role: str, member_of: frozenset[str], epoch: int) -> PolicyView:
        """The login role's view: its own grants and those of ``member_of`` (the roles whose privileges
        it inherits, resolved by the caller) combined, for every governed column."""
        names = self.role_names
        contributing = frozenset(r for r in ({login_role} | member_of) if r in names)
        grants = {c: self.resolve(c, contributing) for c in self.column_ids}
        return PolicyView(
            login_role=login_role,
            epoch=epoch,
            label=login_role if login_role in names else DEFAULT_LABEL,
            roles=contributing,
            grants=MappingProxyType(grants),
            policy=self,
        )


@dataclass(frozen=True, slots=True, eq=False)
class PolicyView:
    """One login role's grants under one policy version (a ``proxy.policy.model.RoleView``).

    ``roles`` are the policy roles that contributed (the login role and the roles it is a member of
    that the policy names); ``grants`` holds every governed column's grant by ``column_id``."""

    login_role: str
    epoch: int
    label: str
    roles: frozenset[str]
    grants: Mapping[str, Grant]
    policy: Policy

    def grant(self, column: ProtectedColumn) -> Grant:
        # A partition's, child's or view's column carries its root's column_id.
        found = self.grants.get(column.column_id)
        return found if found is not None else self.policy.resolve(column.column_id, self.roles)
