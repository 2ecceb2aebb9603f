"""``pgveil admin``: drive a running pgveil through its admin API, or the keystore directly.

    pgveil admin sessions  --admin URL             the client sessions of a running instance
    pgveil admin terminate --admin URL ID          end one (FATAL 57P01 to its client)
    pgveil admin reload    --admin URL             reload its configuration and policy (as SIGHUP)
    pgveil admin keys      --admin URL | --config FILE    key versions per column (never key bytes)
    pgveil admin openapi   --admin URL             the API's OpenAPI document
    pgveil admin token     --name NAME --scope S   make a token and the tokens-file entry for it

``--admin URL`` (or ``$PGVEIL_ADMIN_URL``) names the instance; its token is read from ``--token-file``
(or ``$PGVEIL_ADMIN_TOKEN_FILE``), else from ``$PGVEIL_ADMIN_TOKEN``. There is no option taking the token
itself: a command line is visible to every user of the machine. ``--cacert``, ``--cert`` and ``--key`` are
for an admin port with TLS and mutual TLS. Without ``--admin``, ``keys`` reads the keystore of
``--config`` itself, through the same service code (:mod:`proxy.services`) the API calls.

:class:`AdminClient` and :func:`add_connection_options` are meant for the other subcommands (``keys``,
``jobs``) that want an ``--admin`` mode too.

Exit codes (docs/cli.md): 0 success, 1 the instance refused or failed (401/403/404/409/5xx), 2 usage,
3 the instance unreachable.
Errors are one line on stderr, never a traceback, and never contain the token.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

URL_ENV = "PGVEIL_ADMIN_URL"
TOKEN_ENV = "PGVEIL_ADMIN_TOKEN"
TOKEN_FILE_ENV = "PGVEIL_ADMIN_TOKEN_FILE"


class AdminCliError(Exception):
    """One line for stderr and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any


class AdminClient:
    """A small synchronous client of the admin API (stdlib only)."""

    def __init__(self, url: str, token: str, context: ssl.SSLContext | None = None, timeout: float = 30) -> None:
        if not url.startswith(("http://", "https://")):
            raise AdminCliError(f"pgveil: the admin URL must be http:// or https://, got {url[:80]!r}", 2)
        self.url = url.rstrip("/")
        self._token = token
        self._context = context
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r})"

    def request(self, method: str, path: str, body: Any = None) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - http(s) only
        req.add_header("Authorization", f"Bearer {self._token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._context) as r:  # noqa: S310
                return Answer(r.status, _decode(r.read()))
        except urllib.error.HTTPError as e:
            return Answer(e.code, _decode(e.read()))
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise AdminCliError(f"pgveil: cannot reach the admin API at {self.url}: {reason}", 3) from None

    def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> Any:
        """The body of a successful answer; any other status becomes an :class:`AdminCliError`."""
        answer = self.request(method, path, body)
        if answer.status not in ok:
            raise AdminCliError(_describe_refusal(answer))
        return answer.body


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _describe_refusal(answer: Answer) -> str:
    body = answer.body
    if isinstance(body, dict) and "error" in body:
        detail = f" ({body['detail']})" if body.get("detail") else ""
        text = f"{body['error']}{detail}"
    else:
        text = str(body)[:200]
    if answer.status == 429:
        return f"pgveil: the admin API refuses this client for now: {text}"
    return f"pgveil: the admin API answered {answer.status}: {text}"


# -- connection options --------------------------------------------------------------------------------
def add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admin API connection")
    g.add_argument("--admin", metavar="URL", default=None, help=f"the instance's admin URL (default: ${URL_ENV})")
    g.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token (default: ${TOKEN_FILE_ENV}, else the token in ${TOKEN_ENV})",
    )
    g.add_argument("--cacert", type=Path, default=None, help="CA bundle to verify the admin port's certificate")
    g.add_argument("--cert", type=Path, default=None, help="client certificate for mutual TLS (PEM)")
    g.add_argument("--key", type=Path, default=None, help="its private key (PEM)")


def admin_url(args: argparse.Namespace) -> str | None:
    url: str | None = args.admin or os.environ.get(URL_ENV) or None
    return url


def read_token(args: argparse.Namespace) -> str:
    path = args.token_file or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None)
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AdminCliError(
                f"pgveil: cannot read the token file {path}: {getattr(e, 'strerror', None) or e}", 2
            ) from None
        if not token:
            raise AdminCliError(f"pgveil: the token file {path} is empty", 2)
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise AdminCliError(f"pgveil: no admin token: use --token-file FILE, ${TOKEN_FILE_ENV} or ${TOKEN_ENV}", 2)
    return token


def client_from_args(args: argparse.Namespace) -> AdminClient:
    url = admin_url(args)
    if url is None:
        raise AdminCliError(f"pgveil: no admin URL: use --admin URL or ${URL_ENV}", 2)
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
            if args.cert is not None:
                context.load_cert_chain(args.cert, args.key)
        except (OSError, ssl.SSLError) as e:
            raise AdminCliError(f"pgveil: cannot load the TLS files: {e}", 2) from None
    elif args.cert is not None or args.cacert is not None:
        raise AdminCliError("pgveil: --cacert/--cert need an https:// admin URL", 2)
    return AdminClient(url, read_token(args), context)


# -- output --------------------------------------------------------------------------------------------
def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _print_sessions(body: dict[str, Any]) -> None:
    rows = [
        [
            str(s["id"]),
            s["role"] or "-",
            s["database"] or "-",
            f"{s['client_address'] or '-'}" + (f":{s['client_port']}" if s["client_port"] is not None else ""),
            s["started_at"],
            s["state"],
            "yes" if s["tls"] else "no",
            str(s.get("process", 0)),
        ]
        for s in body["sessions"]
    ]
    print(_table(rows, ["ID", "ROLE", "DATABASE", "CLIENT", "STARTED", "STATE", "TLS", "PROCESS"]))
    others = body.get("other_processes") or {}
    silent = body.get("unanswered") or []
    if silent:
        counts = ", ".join(f"process {k}: {others.get(str(k), '?')}" for k in silent)
        print(f"\nworker processes that did not answer in time serve more, not listed ({counts})")
    elif others and body.get("covers") == "process":  # an instance of an older pgveil lists its own only
        counts = ", ".join(f"process {k}: {v}" for k, v in sorted(others.items(), key=lambda kv: int(kv[0])))
        print(f"\n{len(body['sessions'])} listed in this process; worker processes serve more ({counts})")
    print(f"{body['total']} sessions in all")


def _print_keys(body: dict[str, Any]) -> None:
    if not body.get("keystore", True):
        print("no keystore: nothing is encrypted")
        return
    rows: list[list[str]] = []
    for col in body["columns"]:
        name = col["column"] + ("" if col["configured"] else " (not configured)")
        if not col["versions"] and not col["subject_keys"]:
            rows.append([name, "-", "-", "no key yet (made on first write)", "-"])
        for v in col["versions"]:
            rows.append(
                [
                    name,
                    str(v["version"]),
                    v["state"] + (" current" if v["current"] else ""),
                    v["key_id"],
                    v["kek_id"] or "-",
                ]
            )
        sub = col["subject_keys"]
        if sub:
            states = ", ".join(f"{k} {n}" for k, n in sorted(sub["versions"].items()))
            rows.append([name, "-", f"per subject: {sub['subjects']} subjects", states, "-"])
    print(_table(rows, ["COLUMN", "VERSION", "STATE", "KEY ID", "KEK"]))


def _emit(args: argparse.Namespace, body: Any, human: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        human(body)


# -- commands ------------------------------------------------------------------------------------------
def cmd_sessions(args: argparse.Namespace) -> int:
    _emit(args, client_from_args(args).call("GET", "/v1/sessions"), _print_sessions)
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    body = client_from_args(args).call("DELETE", f"/v1/sessions/{args.id}")
    _emit(args, body, lambda b: print(f"session {b['id']} terminated"))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    answer = client_from_args(args).request("POST", "/v1/policy/reload")
    body = answer.body
    if answer.status not in (200, 409) or not isinstance(body, dict):
        raise AdminCliError(_describe_refusal(answer))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        for line in body["messages"]:
            print(f"  {line}", file=sys.stderr)
        print("configuration reloaded" if body["applied"] else "reload rejected: the running configuration stays")
    return 0 if body["applied"] else 1


def cmd_keys(args: argparse.Namespace) -> int:
    if admin_url(args) is not None:
        body = client_from_args(args).call("GET", "/v1/keys")
    else:
        body = asyncio.run(_keys_direct(args))
    _emit(args, body, _print_keys)
    return 0


async def _keys_direct(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from proxy import services
    from proxy.cli_errors import connect
    from proxy.config import default_config_path, load_config

    config = load_config(args.config if args.config is not None else default_config_path())
    ks = config.keystore
    if ks is None or ks.dsn is None:
        return {"keystore": False, "columns": []}
    conn = await connect("the keystore", ks.dsn, ks.password_file, timeout=10)
    try:
        listing = await services.list_keys(conn, services.key_columns(config))
    except asyncpg.UndefinedTableError:
        raise AdminCliError("pgveil: the keystore is not initialised: run `pgveil keystore init`") from None
    except asyncpg.InsufficientPrivilegeError:
        raise
    except asyncpg.PostgresError as e:
        raise AdminCliError(f"pgveil: reading the keystore failed ({type(e).__name__})") from None
    finally:
        await conn.close()
    body: dict[str, Any] = {"keystore": True, **services.as_json(listing)}
    return body


def cmd_openapi(args: argparse.Namespace) -> int:
    print(json.dumps(client_from_args(args).call("GET", "/v1/openapi.json"), indent=2))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from proxy.admin.auth import Scope

    known = [s.value for s in Scope]
    bad = [s for s in args.scope if s not in known]
    if bad:
        raise AdminCliError(f"pgveil: unknown scope {bad[0]!r} (known: {', '.join(known)})", 2)
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"# token for {args.name} (shown once; give it to its user, keep it out of the tokens file):")
    print(f"#   {token}")
    print("# the entry for admin.tokens_file:")
    print(f"- {{name: {args.name}, sha256: {digest}, scopes: [{', '.join(args.scope)}]}}")
    return 0


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except AdminCliError as e:
            print(e.message, file=sys.stderr)
            return e.code

    return run


def add_parsers(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Registers ``pgveil admin ...`` on the top-level subparsers."""
    a = sub.add_parser("admin", help="talk to a running pgveil's admin API (sessions, reload, keys)")
    asub = a.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help_: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = asub.add_parser(name, help=help_)
        add_connection_options(p)
        p.add_argument("--json", action="store_true", help="print the API's JSON answer")
        p.set_defaults(func=_guarded(func))
        return p

    command("sessions", "list the client sessions of the instance", cmd_sessions)
    t = command("terminate", "end a session (FATAL 57P01 to its client)", cmd_terminate)
    t.add_argument("id", type=int, help="the session id (from `pgveil admin sessions`)")
    command("reload", "reload the instance's configuration and visibility policy (as SIGHUP)", cmd_reload)
    k = command("keys", "key versions per column: from the instance (--admin) or the keystore (--config)", cmd_keys)
    config_arg(k)
    command("openapi", "print the admin API's OpenAPI document", cmd_openapi)
    tok = asub.add_parser("token", help="make a new admin token and its admin.tokens_file entry")
    tok.add_argument("--name", required=True, help="the name logs and records will show for this token")
    tok.add_argument("--scope", action="append", required=True, help="a scope to grant (repeatable)")
    tok.set_defaults(func=_guarded(cmd_token))
