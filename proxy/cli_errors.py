"""How a ``pgveil`` command fails: one clear message on stderr and a documented exit code, never a
traceback (docs/cli.md has the table).

=====  ==================================================================================================
code   meaning
=====  ==================================================================================================
0      done
1      the operation failed or was refused (the message says why)
2      invalid configuration or usage (each problem with the dotted path of its setting)
3      a server could not be reached or refused the login (the keystore, the upstream, the service
       connection, the admin API): the message names host and port and the reason, never a password
4      a connection lacks a privilege: the message says which GRANT (or owner) would fix it
70     an internal error (a bug): the exception's type only; ``PGVEIL_TRACEBACK=1`` shows the traceback
130    interrupted (Ctrl-C, SIGTERM)
=====  ==================================================================================================

:func:`connect` is how the commands open their PostgreSQL connections, so that every connection failure
says what was being reached (``the keystore``), where (host:port, role, database) and why (the OS's
reason, the server's SQLSTATE); :func:`report` turns any exception that reaches ``main`` into its message
and code. Messages never contain a password, a DSN's password, a token or a value: a library exception's
text is shown only where it is the server's own message or the OS's reason.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

OK: Final = 0
FAILED: Final = 1
USAGE: Final = 2
UNREACHABLE: Final = 3
PRIVILEGES: Final = 4
INTERNAL: Final = 70
INTERRUPTED: Final = 130


class CliError(Exception):
    """A command's failure: the message for stderr (without the ``pgveil:`` prefix) and the exit code."""

    def __init__(self, message: str, code: int = FAILED, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


# -- where a DSN points ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    """What a connection reaches, as a message shows it: never the password."""

    what: str  # "the keystore", "the service connection", ...
    host: str
    port: int
    user: str | None
    database: str | None

    @property
    def address(self) -> str:
        if self.host.startswith("/"):
            return f"{self.host} (Unix socket, port {self.port})"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def describe(self) -> str:
        who = f"role {self.user}" if self.user else "its role"
        return f"{self.what} at {self.address} ({who}, database {self.database or self.user or '?'})"


def parse_target(what: str, dsn: str, environ: Mapping[str, str] | None = None) -> Target:
    """Host, port, user and database of a libpq URI or key=value DSN (defaults as libpq's)."""
    env = os.environ if environ is None else environ
    params: dict[str, str] = {}
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
        if userinfo:
            params["user"] = unquote(userinfo.split(":", 1)[0])
        host, _, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
        if not host:  # no ":" at all
            host, port = netloc, ""
        if host:
            params["host"] = unquote(host.strip("[]"))
        if port:
            params["port"] = port
        if parts.path.strip("/"):
            params["dbname"] = unquote(parts.path.strip("/"))
        for key, values in parse_qs(parts.query).items():
            if key in ("host", "port", "user", "dbname") and values:
                params[key] = values[-1]
    else:
        for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn):
            value = m.group(2)
            params[m.group(1)] = value[1:-1] if value.startswith("'") else value
    host = params.get("host") or env.get("PGHOST") or "localhost"
    host = host.split(",")[0]
    raw_port = (params.get("port") or env.get("PGPORT") or "5432").split(",")[0]
    port_number = int(raw_port) if raw_port.isdigit() else 5432
    user = params.get("user") or env.get("PGUSER")
    database = params.get("dbname") or env.get("PGDATABASE") or user
    return Target(what, host, port_number, user, database)


def os_reason(e: BaseException) -> str:
    """The OS's words for a failed connect (``Connection refused``), never the exception's full text."""
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror or 'unknown host'})"
    if isinstance(e, OSError):
        if e.errno is not None and e.errno in errno.errorcode:
            return os.strerror(e.errno)
        # asyncio reports several addresses' failures at once ("Multiple exceptions: [Errno 111] ...").
        found = re.findall(r"\[Errno (\d+)\]", str(e))
        if found:
            return "; ".join(dict.fromkeys(os.strerror(int(n)) for n in found))
        return e.strerror or type(e).__name__
    return type(e).__name__


# -- PostgreSQL connections -------------------------------------------------------------------------------
_current: list[Target] = []  # the connections the command opened, newest last (for privilege hints)


async def connect(what: str, dsn: str, password_file: Path | None = None, *, timeout: float = 30) -> Any:
    """An asyncpg connection to ``dsn`` for ``what`` (``the keystore``); any failure is a :class:`CliError`
    naming host, port, role and database, the OS's reason or the server's SQLSTATE and message."""
    import asyncpg

    from proxy.encrypt.runtime import connect_kwargs

    target = parse_target(what, dsn)
    try:
        kwargs = connect_kwargs(dsn, password_file)
    except OSError as e:
        raise CliError(f"cannot read the password file {password_file} for {what}: {os_reason(e)}", USAGE) from None
    try:
        conn = await asyncpg.connect(**kwargs, timeout=timeout)
    except asyncpg.InvalidAuthorizationSpecificationError as e:  # 28000, 28P01: role, password, pg_hba
        raise CliError(
            f"{target.describe()} refused the login: {_server_text(e)} (SQLSTATE {e.sqlstate})",
            UNREACHABLE,
            hint="check the role and its password (password_file), and the server's pg_hba.conf",
        ) from None
    except asyncpg.InsufficientPrivilegeError as e:  # 42501 at login: no CONNECT on the database
        raise CliError(
            f"{target.describe()} refused the login: {_server_text(e)} (SQLSTATE {e.sqlstate})",
            PRIVILEGES,
            hint=f"GRANT CONNECT ON DATABASE {_ident(target.database)} TO {_ident(target.user)};",
        ) from None
    except asyncpg.InvalidCatalogNameError as e:  # 3D000
        raise CliError(f"{target.describe()}: {_server_text(e)} (SQLSTATE {e.sqlstate})", UNREACHABLE) from None
    except asyncpg.PostgresError as e:
        raise CliError(
            f"{target.describe()} refused the connection: {_server_text(e)} (SQLSTATE {e.sqlstate})", UNREACHABLE
        ) from None
    except (OSError, TimeoutError) as e:
        raise CliError(f"cannot connect to {target.what} at {target.address}: {os_reason(e)}", UNREACHABLE) from None
    except (ValueError, asyncpg.InterfaceError) as e:  # a DSN asyncpg cannot read
        raise CliError(f"cannot use the DSN of {what}: {type(e).__name__}", USAGE) from None
    _current.append(target)
    return conn


async def create_pool(what: str, dsn: str, password_file: Path | None = None, **kw: Any) -> Any:
    """An asyncpg pool; its first connection is made by :func:`connect`, so failures read the same."""
    import asyncpg

    from proxy.encrypt.runtime import connect_kwargs

    probe = await connect(what, dsn, password_file, timeout=30)
    await probe.close()
    return await asyncpg.create_pool(**connect_kwargs(dsn, password_file), **kw)


def _server_text(e: BaseException) -> str:
    # The server's primary message (asyncpg's str()); it names roles and objects, never a password.
    text = str(getattr(e, "args", [""])[0] if getattr(e, "args", None) else "") or type(e).__name__
    return text.splitlines()[0]


def _ident(name: str | None) -> str:
    if not name:
        return "<role>"
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


# -- privileges -----------------------------------------------------------------------------------------
_DENIED = re.compile(r"permission denied for (database|schema|table|relation|sequence|function) (\S+)")
_OWNER = re.compile(r"must be owner of (table|relation|schema|database|sequence|function|view) (\S+)")


def privilege_fix(message: str, role: str | None, database: str | None) -> list[str]:
    """The statements that would give ``role`` what the server's ``message`` (SQLSTATE 42501) says it
    lacks; to be run by the object's owner or a superuser."""
    who = _ident(role)
    m = _DENIED.search(message)
    if m is not None:
        kind, name = m.group(1), m.group(2).strip('"')
        if kind == "database":
            return [f"GRANT CREATE ON DATABASE {_ident(name)} TO {who};  -- pgveil keystore init creates schema pgveil"]
        if kind == "schema":
            fix = [f"GRANT USAGE ON SCHEMA {_ident(name)} TO {who};"]
            if name == "pgveil":
                fix.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgveil TO {who};")
                fix.append(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgveil TO {who};")
                fix.append(
                    f"ALTER SCHEMA pgveil OWNER TO {who};  -- instead, when its migrations (keystore init) still run"
                )
            return fix
        if kind in ("table", "relation"):
            schema = "pgveil" if name in _KEYSTORE_TABLES else None
            if schema == "pgveil":
                return [
                    f"GRANT USAGE ON SCHEMA pgveil TO {who};",
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgveil TO {who};",
                    f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgveil TO {who};",
                ]
            return [
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {name} TO {who};  -- reading and re-encrypting rows",
                f"ALTER TABLE {name} OWNER TO {who};  -- changing it (pgveil schema apply), or run that as its owner",
            ]
        if kind == "sequence":
            return [f"GRANT USAGE, SELECT ON SEQUENCE {name} TO {who};"]
        return [f"GRANT EXECUTE ON FUNCTION {name} TO {who};"]
    m = _OWNER.search(message)
    if m is not None:
        kind, name = m.group(1), m.group(2).strip('"')
        kind = "TABLE" if kind in ("relation", "view") else kind.upper()
        return [f"ALTER {kind} {name} OWNER TO {who};  -- or run the command as the owner of {name} or a superuser"]
    if "event trigger" in message:
        return [f"ALTER ROLE {who} SUPERUSER;  -- only a superuser creates event triggers (or let one run it)"]
    return []


_KEYSTORE_TABLES: Final = frozenset(
    {"deks", "keks", "blind_index_keys", "ledger", "rotation_jobs", "schema_migrations", "kek_versions"}
)


def privilege_error(e: BaseException, target: Target | None = None) -> CliError:
    """A 42501 raised while a command worked on ``target`` (the newest connection when not given)."""
    target = target or (_current[-1] if _current else None)
    text = _server_text(e)
    where = f"{target.describe()}" if target is not None else "a connection"
    fix = privilege_fix(text, target.user if target else None, target.database if target else None)
    hint = "as the owner or a superuser, run:\n    " + "\n    ".join(fix) if fix else "see docs/cli.md (privileges)"
    return CliError(f"{where} lacks a privilege: {text} (SQLSTATE 42501)", PRIVILEGES, hint=hint)


def missing_privilege(exc: BaseException, what: str, dsn: str | None) -> str | None:
    """For the log of a running pgveil, which retries rather than exits: what the 42501 beneath ``exc``
    (raised on ``what``'s connection to ``dsn``) says is missing, and the statements that would fix it;
    None when ``exc`` is not a missing privilege."""
    denied = _denied(exc)
    if denied is None:
        return None
    target = parse_target(what, dsn) if dsn else None
    text = _server_text(denied)
    fix = privilege_fix(text, target.user if target else None, target.database if target else None)
    where = target.describe() if target is not None else what
    # One line: a statement's "-- comment" would swallow the statements after it, so it becomes /* */.
    one_line = [re.sub(r"\s*--\s*(.*)$", r" /* \1 */", f) for f in fix]
    run = "; as the owner or a superuser, run: " + " ".join(one_line) if fix else "; see docs/cli.md (privileges)"
    return f"{where} lacks a privilege: {text} (SQLSTATE 42501){run}"


# -- reporting ------------------------------------------------------------------------------------------
def _lines(exc: BaseException) -> Iterator[tuple[str, int]]:
    """(message, code) for an exception that reached ``main``; the message has no ``pgveil:`` prefix."""
    from proxy.errors import ConfigError, ProxyError

    if isinstance(exc, CliError):
        yield exc.message, exc.code
        return
    denied = _denied(exc)
    if denied is not None:  # also beneath a KeystoreError that wraps the driver's error
        err = privilege_error(denied)
        yield err.message, err.code
        return
    if isinstance(exc, ConfigError):
        yield "invalid configuration:\n  " + "\n  ".join(exc.errors), USAGE
        return
    try:
        from keymgmt.errors import KeyManagementError
    except ImportError:  # pragma: no cover - keymgmt is part of pgveil
        KeyManagementError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, KeyManagementError):
        yield exc.message, FAILED
        return
    if isinstance(exc, ProxyError):
        yield exc.message.removeprefix("pgveil: "), FAILED
        return
    import asyncpg

    if isinstance(exc, asyncpg.UndefinedTableError) and "pgveil." in _server_text(exc):
        yield "the keystore is not initialised (schema pgveil is missing): run `pgveil keystore init`", FAILED
        return
    if isinstance(exc, asyncpg.PostgresError):
        where = _current[-1].describe() if _current else "the server"
        yield f"{where} answered: {_server_text(exc)} (SQLSTATE {exc.sqlstate})", FAILED
        return
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        target = _current[-1] if _current else None
        where = f" with {target.what} at {target.address}" if target else ""
        yield f"the connection{where} failed: {os_reason(exc)}", UNREACHABLE
        return
    if isinstance(exc, OSError) and exc.filename is not None:
        yield f"{exc.filename}: {os_reason(exc)}", FAILED
        return
    yield f"internal error ({type(exc).__name__}); set PGVEIL_TRACEBACK=1 for the traceback", INTERNAL


def _denied(exc: BaseException) -> BaseException | None:
    """The server's 42501 that ``exc`` is, or was raised from."""
    import asyncpg

    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, asyncpg.InsufficientPrivilegeError):
            found: BaseException = seen
            return found
        seen = seen.__cause__
    return None


def hint_of(exc: BaseException) -> str | None:
    if isinstance(exc, CliError):
        return exc.hint
    denied = _denied(exc)
    if denied is not None:
        return privilege_error(denied).hint
    hint = getattr(exc, "hint", None)
    if isinstance(hint, str) and hint:
        return hint
    return None


def report(exc: BaseException, stream: Any = None) -> int:
    """Prints ``exc`` as one message (and a hint) and returns the exit code."""
    out = stream if stream is not None else sys.stderr
    if isinstance(exc, KeyboardInterrupt):
        print("pgveil: interrupted", file=out)
        return INTERRUPTED
    message, code = next(_lines(exc))
    print(f"pgveil: {message}", file=out)
    hint = hint_of(exc)
    if hint:
        print(f"hint: {hint}", file=out)
    if code == INTERNAL and os.environ.get("PGVEIL_TRACEBACK") == "1":
        traceback.print_exception(exc, file=out)
    return code
