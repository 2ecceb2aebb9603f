"""Role membership: which roles' grants a login role gets, from PostgreSQL's membership graph.

The graph is what pgveil's service connection reads from ``pg_roles`` and ``pg_auth_members``
(:mod:`proxy.policy_runtime` does the reading); this module only walks it. It follows the server's own
rule for privileges (``roles_is_member_of`` with ``ROLERECURSE_PRIVS`` in ``src/backend/utils/adt/acl.c``):

- the login role's own grants always count;
- a role R that is a member of G passes G's privileges on only through an *inheriting* membership. Up
  to PostgreSQL 15 that is R's ``rolinherit`` (``NOINHERIT`` roles inherit nothing from the roles they
  were granted, but their own grants, and the roles they were granted to a role that reached them,
  still count); from PostgreSQL 16 it is each grant's ``inherit_option``. Each edge carries the flag,
  so one walk serves both.

``SET ROLE``, ``SET SESSION AUTHORIZATION`` and ``RESET ROLE`` play no part: only the login role is ever
resolved. Superusers get nothing special (``rolsuper`` is not read). PostgreSQL refuses grants that
would make a cycle, but the walk visits every role once, so a cycle (or a self-edge) cannot loop.

Must not: do I/O, or decide visibility (that is :mod:`proxy.policy.rules`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Membership:
    """``member`` is a member of ``role`` (one row of ``pg_auth_members``); ``inherit`` says whether
    ``member`` gets ``role``'s privileges through it (see the module docstring)."""

    member: str
    role: str
    inherit: bool


@dataclass(frozen=True, slots=True)
class MembershipGraph:
    """Every role name the server knows and every membership between them, as read in one snapshot."""

    roles: frozenset[str]
    memberships: tuple[Membership, ...] = ()
    _granted: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        granted: dict[str, list[str]] = {}
        for m in self.memberships:
            if m.inherit:
                granted.setdefault(m.member, []).append(m.role)
        object.__setattr__(self, "_granted", {k: tuple(sorted(set(v))) for k, v in granted.items()})

    @classmethod
    def build(cls, roles: Iterable[str], memberships: Iterable[Membership]) -> MembershipGraph:
        ms = tuple(sorted(set(memberships), key=lambda m: (m.member, m.role, m.inherit)))
        return cls(frozenset(roles), ms)

    def knows(self, role: str) -> bool:
        return role in self.roles

    def inherited_roles(self, login_role: str) -> frozenset[str]:
        """The login role and every role whose privileges it inherits. A role the graph does not know
        yields just itself (the caller decides whether that is good enough: see ``knows``)."""
        seen = {login_role}
        frontier = [login_role]
        granted = self._granted
        while frontier:
            member = frontier.pop()
            for role in granted.get(member, ()):
                if role not in seen:
                    seen.add(role)
                    frontier.append(role)
        return frozenset(seen)

    def to_json(self) -> dict[str, object]:
        """A plain-data form for ``pgveil catalog snapshot``."""
        return {
            "roles": sorted(self.roles),
            "memberships": [{"member": m.member, "role": m.role, "inherit": m.inherit} for m in self.memberships],
        }

    @classmethod
    def from_json(cls, data: object) -> MembershipGraph:
        """The inverse of ``to_json``; ``ValueError`` names what is malformed."""
        if not isinstance(data, dict):
            raise ValueError("membership: expected a mapping")
        roles = data.get("roles")
        memberships = data.get("memberships")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError("membership.roles: expected a list of role names")
        if not isinstance(memberships, list):
            raise ValueError("membership.memberships: expected a list")
        out: list[Membership] = []
        for i, m in enumerate(memberships):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("member"), str)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("inherit"), bool)
            ):
                raise ValueError(f"membership.memberships[{i}]: expected member, role (names) and inherit (boolean)")
            out.append(Membership(m["member"], m["role"], m["inherit"]))
        return cls.build(roles, out)
