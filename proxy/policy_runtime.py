"""The visibility policy at run time: the running policy, the server's role membership, and each login
role's :class:`~proxy.policy.model.RoleView` made from the two.

I/O lives here and nowhere in ``proxy.policy``: the membership graph is read from ``pg_roles`` and
``pg_auth_members`` through pgveil's own service connection (never a client's session), in one statement
(one snapshot), and cached. It is read again

- when the policy is reloaded (SIGHUP),
- when a session's role DDL (``GRANT``/``REVOKE`` of a role, ``CREATE``/``ALTER``/``DROP ROLE``) has
  completed and its transaction has ended (the relay reports it; the service connection cannot see the
  change before the commit),
- when a login role appears that the cached graph does not know (a role created since the last read),
- and every ``policy.membership_refresh_seconds`` (changes made without going through pgveil).

Reads are coalesced: one runs at a time, and requests made meanwhile cause one more.

Every change of the policy or of the graph bumps ``epoch``; a RoleView carries the epoch it was made
under, so a prepared statement decided under an older one is decided again.

Fail closed: until the graph has been read once, ``view`` raises :class:`MembershipNotLoaded` (SQLSTATE
55000): statements on governed columns are refused, as while the catalog is loading. A failed re-read
keeps the last good graph (membership changes wait for the next successful read, and the failure is
logged and counted).

A login role the last good graph does not know (created since) asks for a read at once. Meanwhile it is
resolved as a member of no role only where that cannot reveal more than any membership would
(:func:`safe_without_membership`): grants combine by "most permissive wins", so adding roles only widens
a view, except where ``default`` applied and a group that covers the column grants less than the
default. Where the policy has such a column, the role is refused 55000 until the read knows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proxy.errors import ProxyError, RefusalReason
from proxy.policy.membership import Membership, MembershipGraph
from proxy.policy.model import Grant, RoleView, Visibility
from proxy.policy.rules import DEFAULT_KEY, Policy, permissiveness

log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS = 30.0
# A login role the graph does not know asks for a re-read, at most this often (a stream of sessions of a
# role dropped meanwhile must not turn into a stream of catalog reads).
UNKNOWN_ROLE_REFRESH_SECONDS = 1.0
_MAX_CACHED_VIEWS = 10_000

# The CommandComplete tags of statements that can change role membership (PostgreSQL's cmdtaglist.h).
ROLE_DDL_TAGS = frozenset({b"GRANT ROLE", b"REVOKE ROLE", b"CREATE ROLE", b"DROP ROLE", b"ALTER ROLE"})

# One statement, so one snapshot. Up to PostgreSQL 15 a membership inherits when the member has
# rolinherit; from 16 each grant carries inherit_option (pg_auth_members, "System Catalogs").
_MEMBERSHIP_SQL = """
SELECT m.rolname AS member, r.rolname AS role, {inherit} AS inherit
FROM pg_catalog.pg_auth_members a
JOIN pg_catalog.pg_roles m ON m.oid = a.member
JOIN pg_catalog.pg_roles r ON r.oid = a.roleid
UNION ALL
SELECT rolname, NULL, NULL FROM pg_catalog.pg_roles
"""
_INHERIT_PG15 = "m.rolinherit"
_INHERIT_PG16 = "a.inherit_option"


class MembershipConnection(Protocol):
    """The part of ``asyncpg.Connection`` used here."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...


class PolicySource(Protocol):
    """The running policy as this module sees it (``proxy.policy.rules.Policy``)."""

    def view(self, login_role: str, member_of: frozenset[str], epoch: int) -> RoleView: ...


def _reveals(grant: Grant) -> tuple[int, int, str]:
    """``permissiveness`` (lower reveals more), with deny counted as hidden: neither lets a value out."""
    return permissiveness(Grant(Visibility.HIDDEN) if grant.visibility is Visibility.DENY else grant)


def safe_without_membership(policy: Policy, login_role: str) -> bool:
    """Whether resolving ``login_role`` as a member of no role can never reveal more than its real
    membership would: for every governed column, either its own entry covers the column (its own grant
    is the floor of any combination), or no policy role grants less on the column than the default does
    (so no group could lower what the default gives)."""
    default = _reveals(policy.default)
    own = {c: policy.resolve(c, (login_role,)) for c in policy.column_ids} if login_role in policy.role_names else {}
    for column_id in policy.column_ids:
        mine = own.get(column_id)
        if mine is not None and mine.source != DEFAULT_KEY:
            continue
        for role in policy.role_names:
            if _reveals(policy.resolve(column_id, (role,))) > default:
                return False
    return True


class MembershipNotLoaded(ProxyError):
    """The login role's membership is not known yet: statements on governed columns are refused."""

    sqlstate = "55000"
    reason = RefusalReason.NOT_READY


async def read_membership(conn: MembershipConnection) -> MembershipGraph:
    """Every role and every membership, in one snapshot."""
    version = int(await conn.fetchval("SELECT pg_catalog.current_setting('server_version_num')"))
    sql = _MEMBERSHIP_SQL.format(inherit=_INHERIT_PG16 if version >= 160000 else _INHERIT_PG15)
    roles: list[str] = []
    memberships: list[Membership] = []
    for r in await conn.fetch(sql):
        if r["role"] is None:
            roles.append(r["member"])
        else:
            memberships.append(Membership(r["member"], r["role"], bool(r["inherit"])))
    return MembershipGraph.build(roles, memberships)


def member_of(graph: MembershipGraph, login_role: str) -> frozenset[str]:
    """The roles besides the login role whose grants it gets."""
    return graph.inherited_roles(login_role) - {login_role}


class PolicyRuntime:
    """The process's policy and membership; the factory of every session's RoleView."""

    def __init__(
        self,
        policy: PolicySource | None,
        connect: Callable[[], Awaitable[Any]] | None = None,
        *,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self._connect = connect
        self.refresh_seconds = refresh_seconds
        self.on_change = on_change  # told after every epoch bump (e.g. to drop cached decisions)
        self.graph: MembershipGraph | None = None
        self.epoch = 1
        self._views: dict[str, RoleView] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._poll_task: asyncio.Task[None] | None = None
        self._unknown_asked = 0.0
        # Plain counters for the metrics and the tests.
        self.membership_reads = 0
        self.membership_read_failures = 0
        self.membership_changes = 0

    # -- what sessions use -----------------------------------------------------------------------------
    def view(self, login_role: str) -> RoleView:
        """The login role's view under the current policy and membership (cached per epoch)."""
        cached = self._views.get(login_role)
        if cached is not None:
            return cached
        graph = self.graph
        if graph is None:
            raise MembershipNotLoaded(
                "pgveil: role membership not loaded yet",
                hint="statements on governed columns are refused until pgveil has read pg_auth_members",
            )
        if self.policy is None:
            raise MembershipNotLoaded("pgveil: the visibility policy is not loaded yet")
        if graph.knows(login_role):
            roles = member_of(graph, login_role)
        else:
            self._ask_for_unknown_role()
            if not (isinstance(self.policy, Policy) and safe_without_membership(self.policy, login_role)):
                raise MembershipNotLoaded(
                    "pgveil: role membership of the login role not loaded yet",
                    hint="the role is newer than pgveil's last read of pg_auth_members; retry the statement",
                )
            roles = frozenset()  # until the read that knows it bumps the epoch
        view = self.policy.view(login_role, roles, self.epoch)
        if len(self._views) >= _MAX_CACHED_VIEWS:
            self._views.clear()
        self._views[login_role] = view
        return view

    def view_source(self, login_role: str) -> Callable[[], RoleView]:
        """What a session calls before each statement: its login role's current view. Only the login
        role is ever bound here, so SET ROLE and SET SESSION AUTHORIZATION cannot change it."""
        return lambda: self.view(login_role)

    @property
    def loaded(self) -> bool:
        return self.graph is not None

    # -- changes ---------------------------------------------------------------------------------------
    def install_policy(self, policy: PolicySource) -> bool:
        """Swaps the policy in one assignment: sessions see the old one or the new one, never a mix. An
        equal policy (the same file loaded again) changes nothing, so prepared statements stay decided.
        Whether it changed."""
        if policy == self.policy:
            return False
        self.policy = policy
        self._bump()
        return True

    def set_refresh_seconds(self, seconds: float) -> None:
        if seconds == self.refresh_seconds:
            return
        self.refresh_seconds = seconds
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
            self.start_polling()

    def install_membership(self, graph: MembershipGraph) -> bool:
        """Installs a freshly read graph; whether it differs from the one before."""
        if graph == self.graph:
            return False
        first = self.graph is None
        self.graph = graph
        if not first:
            self.membership_changes += 1
            log.info("role membership changed: %d roles, %d memberships", len(graph.roles), len(graph.memberships))
        self._bump()
        return True

    def _bump(self) -> None:
        self.epoch += 1
        self._views = {}
        if self.on_change is not None:
            self.on_change()

    # -- reading the graph -----------------------------------------------------------------------------
    async def refresh_with(self, conn: MembershipConnection) -> bool:
        """Reads the graph over ``conn`` and installs it; False (the last good graph stays) if it failed."""
        try:
            graph = await read_membership(conn)
        except (OSError, ProxyError) as e:
            self._read_failed(e)
            return False
        except Exception as e:  # asyncpg's errors, without importing the driver here
            if type(e).__module__.startswith("asyncpg"):
                self._read_failed(e)
                return False
            raise
        self.membership_reads += 1
        self.install_membership(graph)
        return True

    async def refresh(self) -> bool:
        """Opens a service connection and reads the graph."""
        if self._connect is None:
            return False
        try:
            conn = await self._connect()
        except Exception as e:  # any failure to connect leaves the last good graph
            self._read_failed(e)
            return False
        try:
            return await self.refresh_with(conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def _read_failed(self, e: BaseException) -> None:
        self.membership_read_failures += 1
        if self.graph is None:
            log.warning(
                "cannot read role membership (%s); governed columns are refused until it is read", type(e).__name__
            )
        else:
            log.warning("cannot read role membership (%s); the last one read stays in force", type(e).__name__)

    def schedule_refresh(self) -> None:
        """Reads the graph again soon (coalesced); callable from synchronous code on the loop."""
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._refresh_task = loop.create_task(self._refresh_loop())

    def role_ddl_completed(self) -> None:
        """A session's role DDL has completed and its transaction ended."""
        log.debug("role DDL noticed; reading role membership again")
        self.schedule_refresh()

    def _ask_for_unknown_role(self) -> None:
        now = time.monotonic()
        if now - self._unknown_asked >= UNKNOWN_ROLE_REFRESH_SECONDS:
            self._unknown_asked = now
            self.schedule_refresh()

    async def _refresh_loop(self) -> None:
        while True:
            self._refresh_again = False
            await self.refresh()
            if not self._refresh_again:
                return

    def start_polling(self) -> None:
        if self._poll_task is None and self.refresh_seconds > 0:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            self.schedule_refresh()

    async def stop(self) -> None:
        for task in (self._poll_task, self._refresh_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._poll_task = self._refresh_task = None
