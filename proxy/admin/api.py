"""The versioned admin API (``/v1``): its operations, who may call them, and what each call leaves behind.

Every route is an :class:`Operation` in one table (:func:`operations`): method, path, the one scope it
needs, whether it changes anything, and the shapes of its answers. The aiohttp routes and the OpenAPI
document (:mod:`proxy.admin.openapi`) are both made from that table, so the document cannot describe a
route that does not exist or miss one that does.

Each call goes through :class:`Guard` first: a client address over the failure limit gets 429 (with
Retry-After) before its token is looked at; no token 401, an unknown token 401 (counted as a failure), a
token without the route's scope 403. A mutating call is then recorded with the token's *name* (never the
token) by an :data:`ActionRecorder`: the log today, the ledger once it exists (pass another recorder).

Without a tokens file the API is disabled: every ``/v1`` path answers 404 saying so. It is never open.

Handlers only translate HTTP to :mod:`proxy.services` calls and back; they hold no logic of their own.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from proxy import logsetup, services
from proxy.admin.auth import FailureLimiter, Scope, Token, TokenFile, bearer_token
from proxy.admin.metrics import AdminMetrics
from proxy.config import AdminConfig
from proxy.errors import ConfigError

log = logging.getLogger(__name__)
action_log = logging.getLogger("proxy.admin.actions")

API_VERSION: Final = "v1"
REALM: Final = "pgveil"

JSON = dict[str, Any]
Handler = Callable[[web.Request, Token], Awaitable[web.Response]]


# -- what a mutating call leaves behind ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AdminAction:
    """One mutating call: who (the token's name), what (operation and route template), on what
    (``target``, e.g. a session id), from where, and how it ended (HTTP status)."""

    token: str
    operation: str
    method: str
    route: str
    status: int
    client_address: str | None
    target: str | None = None


ActionRecorder = Callable[[AdminAction], Awaitable[None]]


async def log_action(action: AdminAction) -> None:
    action_log.info(
        "admin action %s by token %r from %s: %s %s%s -> %d",
        action.operation,
        action.token,
        action.client_address or "?",
        action.method,
        action.route,
        f" (target {action.target})" if action.target else "",
        action.status,
    )


# -- errors --------------------------------------------------------------------------------------------
def error(
    status: int, message: str, detail: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    body: JSON = {"error": message}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=status, headers=dict(headers or {}))


def _challenge(error_code: str | None = None, scope: Scope | None = None) -> dict[str, str]:
    # RFC 6750, section 3: the WWW-Authenticate challenge of the Bearer scheme.
    parts = [f'realm="{REALM}"']
    if error_code is not None:
        parts.append(f'error="{error_code}"')
    if scope is not None:
        parts.append(f'scope="{scope.value}"')
    return {"WWW-Authenticate": "Bearer " + ", ".join(parts)}


class Guard:
    """Authenticates a request's bearer token against the tokens file and checks one scope."""

    def __init__(self, tokens: TokenFile, limiter: FailureLimiter, metrics: AdminMetrics | None = None) -> None:
        self.tokens = tokens
        self.limiter = limiter
        self.metrics = metrics

    def _failed(self, address: str) -> None:
        self.limiter.failed(address)
        if self.metrics is not None:
            self.metrics.auth_failed()

    def authorize(self, request: web.BaseRequest, scope: Scope) -> Token | web.Response:
        """The caller's token, or the response that refuses it (429, 401, 403, 503)."""
        address = request.remote or "?"
        wait = self.limiter.retry_after(address)
        if wait is not None:
            return error(
                429,
                "too many failed authentications",
                f"this client address is refused for {wait} s",
                {"Retry-After": str(wait)},
            )
        presented = bearer_token(request.headers.get("Authorization"))
        if presented is None:
            if "Authorization" in request.headers:
                self._failed(address)
                log.warning("admin authentication failed from %s: malformed Authorization header", address)
                return error(
                    401, "unauthorized", "expected 'Authorization: Bearer <token>'", _challenge("invalid_request")
                )
            return error(401, "unauthorized", "a bearer token is required", _challenge())
        if not self.tokens.usable:
            return error(503, "admin tokens unavailable", "the tokens file is unreadable or invalid; see pgveil's log")
        token = self.tokens.lookup(presented)
        if token is None:
            self._failed(address)
            log.warning("admin authentication failed from %s: unknown token", address)
            return error(401, "unauthorized", "the token is not valid", _challenge("invalid_token"))
        if scope not in token.scopes:
            log.warning("admin request by token %r refused: it lacks scope %s", token.name, scope.value)
            return error(
                403, "forbidden", f"the token lacks scope {scope.value}", _challenge("insufficient_scope", scope)
            )
        return token


# -- the operations ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Response:
    description: str
    schema: JSON | None = None  # None: the common error body


@dataclass(frozen=True, slots=True)
class Parameter:
    name: str
    description: str
    schema: JSON


@dataclass(frozen=True, slots=True)
class Operation:
    """One route of the API, the source of both its aiohttp route and its OpenAPI description."""

    method: str
    path: str  # under /v1, in OpenAPI's (and aiohttp's) {name} syntax
    operation_id: str
    summary: str
    scope: Scope
    handler: Handler
    responses: Mapping[int, Response]
    mutating: bool = False
    parameters: Sequence[Parameter] = ()
    request_body: JSON | None = None
    tags: Sequence[str] = field(default_factory=tuple)


SESSION_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["id", "role", "database", "client_address", "client_port", "started_at", "state", "tls", "process"],
    "properties": {
        "id": {
            "type": "integer",
            "description": "the session id of pgveil's log lines ([s<id>]), unique over all processes",
        },
        "role": {"type": ["string", "null"], "description": "the login role"},
        "database": {"type": ["string", "null"]},
        "client_address": {"type": ["string", "null"]},
        "client_port": {"type": ["integer", "null"]},
        "started_at": {"type": "string", "format": "date-time"},
        "state": {"type": "string", "enum": [s.value for s in services.SessionState]},
        "tls": {"type": "boolean", "description": "whether the client connected with TLS"},
        "process": {
            "type": "integer",
            "minimum": 0,
            "description": "the process serving it: 0 the supervisor (or the only process), N worker N",
        },
    },
    "additionalProperties": False,
}
_WORKER_NUMBERS: Final[JSON] = {"type": "array", "items": {"type": "integer", "minimum": 1}}
SESSION_LIST_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["covers", "process", "sessions", "other_processes", "unanswered", "total"],
    "properties": {
        "covers": {
            "type": "string",
            "enum": ["process", "all", "partial"],
            "description": "process: pgveil runs as one process; all: every process listed its sessions; "
            "partial: the worker processes in unanswered did not answer in time (counted, not listed)",
        },
        "process": {"type": "integer", "description": "0: the supervisor (the process serving this API)"},
        "sessions": {"type": "array", "items": SESSION_SCHEMA},
        "other_processes": {
            "type": "object",
            "description": "with sessions.workers > 1: sessions per worker process",
            "additionalProperties": {"type": "integer"},
        },
        "unanswered": {**_WORKER_NUMBERS, "description": "worker processes that did not answer in time"},
        "total": {"type": "integer", "description": "sessions of every process"},
    },
    "additionalProperties": False,
}
TERMINATED_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["id", "terminated", "process"],
    "properties": {
        "id": {"type": "integer"},
        "terminated": {"type": "boolean", "const": True},
        "process": {"type": "integer", "minimum": 0, "description": "the process that served the session"},
    },
    "additionalProperties": False,
}
RELOAD_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["applied", "messages"],
    "properties": {
        "applied": {"type": "boolean"},
        "messages": {"type": "array", "items": {"type": "string"}, "description": "what pgveil logged about it"},
    },
    "additionalProperties": False,
}
KEY_VERSION_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["version", "key_id", "state", "kek_id", "created_at", "destroyed_at", "current"],
    "properties": {
        "version": {"type": "integer", "minimum": 1},
        "key_id": {"type": "string", "format": "uuid", "description": "the key id every envelope carries"},
        "state": {"type": "string", "enum": ["ENABLED", "DISABLED", "DESTROYED"]},
        "kek_id": {"type": ["string", "null"], "description": "the master key version that wraps it"},
        "created_at": {"type": ["string", "null"], "format": "date-time"},
        "destroyed_at": {"type": ["string", "null"], "format": "date-time"},
        "current": {"type": "boolean", "description": "the highest version (used for new writes if ENABLED)"},
    },
    "additionalProperties": False,
}
KEYS_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["keystore", "columns"],
    "properties": {
        "keystore": {"type": "boolean", "description": "false: nothing is encrypted, so there is no keystore"},
        "columns": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["column", "configured", "versions", "subject_keys"],
                "properties": {
                    "column": {"type": "string", "description": "schema.table.column"},
                    "configured": {"type": "boolean"},
                    "versions": {"type": "array", "items": KEY_VERSION_SCHEMA},
                    "subject_keys": {
                        "type": ["object", "null"],
                        "required": ["subjects", "versions"],
                        "properties": {
                            "subjects": {"type": "integer"},
                            "versions": {"type": "object", "additionalProperties": {"type": "integer"}},
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
OPENAPI_SCHEMA: Final[JSON] = {"type": "object", "required": ["openapi", "info", "paths"]}

INSTANCE: Final = web.AppKey[services.Instance]("pgveil_admin_instance")
OPERATIONS: Final = web.AppKey[tuple["Operation", ...]]("pgveil_admin_operations")


def _instance(request: web.Request) -> services.Instance:
    return request.app[INSTANCE]


async def _get_sessions(request: web.Request, token: Token) -> web.Response:
    listing = await services.list_sessions(_instance(request))
    body = services.as_json(listing)
    body["total"] = listing.total
    return web.json_response(body)


_MAX_SESSION_ID: Final = (1 << 63) - 1


def _workers(numbers: Sequence[int]) -> str:
    return ("worker process " if len(numbers) == 1 else "worker processes ") + ", ".join(map(str, numbers))


async def _delete_session(request: web.Request, token: Token) -> web.Response:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit():
        return error(400, "bad request", "a session id is a non-negative integer")
    sid = int(raw) if len(raw) <= 19 else -1  # longer than any id a process hands out
    if sid < 0 or sid > _MAX_SESSION_ID:
        return error(404, "not found", f"pgveil serves no session {raw[:20]}")
    outcome = await services.terminate_session(_instance(request), sid)
    if outcome.terminated:
        return web.json_response({"id": sid, "terminated": True, "process": outcome.process})
    if outcome.unanswered:
        return error(
            503,
            "worker processes did not answer",
            f"{_workers(outcome.unanswered)} did not answer in time: session {sid} may be one of theirs; try again",
        )
    return error(404, "not found", f"pgveil serves no session {sid}")


async def _post_policy_reload(request: web.Request, token: Token) -> web.Response:
    outcome = _instance(request).reload_reporting()
    return web.json_response(services.as_json(outcome), status=200 if outcome.applied else 409)


MAX_EXPLAIN_STATEMENT: Final = 1 << 20


async def _post_policy_explain(request: web.Request, token: Token) -> web.Response:
    explainer = _instance(request).explainer()
    if explainer is None:  # the route exists only with an explainer; a reload cannot take it away
        return error(404, "not found", "policy explain is not available in this instance")
    try:
        body = await request.json()
    except ValueError:
        return error(400, "bad request", 'expected a JSON object {"role": ..., "statement": ...}')
    role = body.get("role") if isinstance(body, dict) else None
    statement = body.get("statement") if isinstance(body, dict) else None
    if not isinstance(role, str) or not role or len(role.encode()) > 63:
        return error(400, "bad request", "role must be a PostgreSQL role name (1 to 63 bytes)")
    if not isinstance(statement, str) or not statement.strip() or len(statement) > MAX_EXPLAIN_STATEMENT:
        return error(400, "bad request", "statement must be the SQL text to explain (at most 1 MiB)")
    if isinstance(body, dict) and set(body) - {"role", "statement"}:
        return error(400, "bad request", "only role and statement may be given")
    # JSON may carry lone surrogates, which no SQL text holds: they are explained as U+FFFD.
    statement = statement.encode("utf-8", "replace").decode("utf-8")
    try:
        answer = await explainer(role, statement)
    except services.ExplainUnavailable as e:
        return error(503, "policy explain unavailable", str(e))
    return web.json_response(dict(answer))


async def _get_keys(request: web.Request, token: Token) -> web.Response:
    inst = _instance(request)
    connect = inst.keystore_connection()
    if connect is None:
        return web.json_response({"keystore": False, "columns": []})
    try:
        conn = await connect()
    except Exception as e:  # any failure to connect: its text may hold the DSN
        log.warning("admin: keystore connection failed (%s)", type(e).__name__)
        return error(503, "keystore unavailable", "pgveil cannot reach its keystore")
    try:
        listing = await services.list_keys(conn, inst.configured_key_columns())
    except Exception as e:
        if type(e).__name__ == "UndefinedTableError":
            return error(503, "keystore not initialised", "run `pgveil keystore init`")
        log.warning("admin: reading the keystore failed (%s)", type(e).__name__)
        return error(503, "keystore unavailable", "reading the keystore failed")
    finally:
        try:
            await conn.close()
        except Exception as e:
            log.debug("admin: closing a keystore connection failed (%s)", type(e).__name__)
    return web.json_response({"keystore": True, **services.as_json(listing)})


LOGGING_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["level"],
    "properties": {
        "level": {
            "type": "string",
            "enum": list(logsetup.LEVELS),
            "description": "the level of the supervisor (or the only process) now, which every worker follows",
        },
        "previous": {"type": "string", "enum": list(logsetup.LEVELS), "description": "the level before the call"},
        "changed": {"type": "boolean"},
        "workers": {
            "type": "object",
            "description": "only with sessions.workers > 1: each worker process's level as it answered, null if it "
            "did not answer in time (it gets the level all the same: requests are queued, a restarted worker "
            "starts at it)",
            "additionalProperties": {"type": ["string", "null"], "enum": [*logsetup.LEVELS, None]},
        },
    },
    "additionalProperties": False,
}
LOGGING_REQUEST_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["level"],
    "properties": {"level": {"type": "string", "enum": list(logsetup.LEVELS)}},
    "additionalProperties": False,
}


def _with_workers(body: JSON, levels: services.LogLevels) -> JSON:
    if levels.workers is not None:
        body["workers"] = services.as_json(levels.workers)
    return body


async def _get_logging(request: web.Request, token: Token) -> web.Response:
    levels = await services.log_levels(_instance(request))
    return web.json_response(_with_workers({"level": levels.level}, levels))


async def _put_logging(request: web.Request, token: Token) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        body = None
    level = body.get("level") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"level"} or level not in logsetup.LEVELS:
        return error(400, "bad request", 'expected {"level": "debug" | "info" | "warning" | "error"}')
    levels = await services.log_levels(_instance(request), level, source="api")
    body = {"level": levels.level, "previous": levels.previous, "changed": levels.changed}
    return web.json_response(_with_workers(body, levels))


async def _get_openapi(request: web.Request, token: Token) -> web.Response:
    from proxy.admin.openapi import build_document

    ops: tuple[Operation, ...] = request.app[OPERATIONS]
    return web.json_response(build_document(ops))


AUTH_RESPONSES: Final[Mapping[int, Response]] = {
    401: Response("no token, or a token pgveil does not know"),
    403: Response("the token lacks the scope this operation needs"),
    429: Response("too many failed authentications from this client address (see Retry-After)"),
    503: Response("the tokens file has become unreadable or invalid"),
}


EXPLAIN_REQUEST_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["role", "statement"],
    "properties": {
        "role": {
            "type": "string",
            "minLength": 1,
            "maxLength": 63,
            "pattern": "^[!-~]+$",
            "description": "the login role to explain for (printable ASCII here; the CLI takes any name)",
        },
        "statement": {
            "type": "string",
            "minLength": 1,
            "pattern": "[!-~]",
            "description": "SQL text; analysed here, never executed",
        },
    },
    "additionalProperties": False,
}
EXPLANATION_SCHEMA: Final[JSON] = {
    "type": "object",
    "required": ["role", "allowed", "statements"],
    "properties": {
        "role": {"type": "string"},
        "policy_roles": {"type": "array", "items": {"type": "string"}},
        "allowed": {"type": "boolean"},
        "statements": {"type": "array", "items": {"type": "object"}},
    },
}


def explain_operation() -> Operation:
    """``POST /v1/policy/explain``: offered by instances that can explain (see :meth:`Instance.explainer`)."""
    return Operation(
        "POST",
        "/policy/explain",
        "explainPolicy",
        "what a role would get for a statement under the running policy (nothing is sent to the server)",
        Scope.ADMIN_READ,
        _post_policy_explain,
        {
            200: Response("the explanation, per statement and result column", EXPLANATION_SCHEMA),
            400: Response("the body is not {role, statement}"),
            503: Response("the catalog or role membership is not loaded yet, or the tokens file is invalid"),
        },
        request_body=EXPLAIN_REQUEST_SCHEMA,
        tags=("policy",),
    )


def operations(*, explain: bool = False) -> tuple[Operation, ...]:
    """Every route of the API. Key management adds its operations (rotations, jobs, subjects) here."""
    return (*_base_operations(), *((explain_operation(),) if explain else ()))


def _base_operations() -> tuple[Operation, ...]:
    return (
        Operation(
            "GET",
            "/sessions",
            "listSessions",
            "the client sessions of every process, with role, database, client address and start time",
            Scope.ADMIN_READ,
            _get_sessions,
            {200: Response("the sessions", SESSION_LIST_SCHEMA)},
            tags=("sessions",),
        ),
        Operation(
            "DELETE",
            "/sessions/{id}",
            "terminateSession",
            "end a session: FATAL 57P01 to its client, its server connection closed",
            Scope.SESSIONS_TERMINATE,
            _delete_session,
            {
                200: Response("the session is being closed", TERMINATED_SCHEMA),
                400: Response("the id is not a session id"),
                404: Response("no process serves a session with this id"),
                503: Response("a worker process did not answer in time (or the tokens file is invalid)"),
            },
            mutating=True,
            parameters=(Parameter("id", "the session id (from GET /v1/sessions)", {"type": "integer", "minimum": 0}),),
            tags=("sessions",),
        ),
        Operation(
            "POST",
            "/policy/reload",
            "reloadPolicy",
            "re-read the configuration file and apply the visibility policy, as on SIGHUP",
            Scope.POLICY_RELOAD,
            _post_policy_reload,
            {
                200: Response("the configuration was reloaded", RELOAD_SCHEMA),
                409: Response("the new configuration was rejected; the running one stays", RELOAD_SCHEMA),
            },
            mutating=True,
            tags=("policy",),
        ),
        Operation(
            "GET",
            "/keys",
            "listKeys",
            "the key versions of every encrypted column (never key material)",
            Scope.ADMIN_READ,
            _get_keys,
            {
                200: Response("the key versions per column", KEYS_SCHEMA),
                503: Response("the keystore cannot be read, or the tokens file is invalid"),
            },
            tags=("keys",),
        ),
        Operation(
            "GET",
            "/logging",
            "getLogging",
            "the log level of pgveil (and of each worker process)",
            Scope.ADMIN_READ,
            _get_logging,
            {200: Response("the log level", LOGGING_SCHEMA)},
            tags=("logging",),
        ),
        Operation(
            "PUT",
            "/logging",
            "setLogLevel",
            "change the log level of every process until the next reload (which applies logging.level again)",
            Scope.POLICY_RELOAD,
            _put_logging,
            {
                200: Response("the level now and before", LOGGING_SCHEMA),
                400: Response("the body is not {level}"),
            },
            mutating=True,
            request_body=LOGGING_REQUEST_SCHEMA,
            tags=("logging",),
        ),
        Operation(
            "GET",
            "/openapi.json",
            "getOpenAPI",
            "this API's OpenAPI 3.1 document",
            Scope.ADMIN_READ,
            _get_openapi,
            {200: Response("the OpenAPI document", OPENAPI_SCHEMA)},
            tags=("meta",),
        ),
    )


def _route_handler(
    op: Operation, guard: Guard, record: ActionRecorder
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    route = f"/{API_VERSION}{op.path}"

    async def handle(request: web.Request) -> web.StreamResponse:
        outcome = guard.authorize(request, op.scope)
        if isinstance(outcome, web.Response):
            if guard.metrics is not None:
                guard.metrics.request(op.operation_id, outcome.status)
            return outcome
        status = 500  # what the record says if the handler raises (the error middleware answers 500)
        try:
            response = await op.handler(request, outcome)
            status = response.status
        finally:
            if guard.metrics is not None:
                guard.metrics.request(op.operation_id, status)
            if op.mutating:
                target = request.match_info.get("id")
                await record(
                    AdminAction(
                        token=outcome.name,
                        operation=op.operation_id,
                        method=op.method,
                        route=route,
                        status=status,
                        client_address=request.remote,
                        target=target if target is not None and target.isdigit() else None,
                    )
                )
        return response

    return handle


def build_api_app(
    instance: services.Instance,
    guard: Guard,
    *,
    record: ActionRecorder = log_action,
    ops: Sequence[Operation] | None = None,
) -> web.Application:
    """The ``/v1`` application (mount it with :func:`proxy.admin.app.build_admin_app`'s ``api``)."""
    app = web.Application()
    table = tuple(ops if ops is not None else operations(explain=instance.explainer() is not None))
    app[INSTANCE] = instance
    app[OPERATIONS] = table
    for op in table:
        app.router.add_route(op.method, op.path, _route_handler(op, guard, record))
    return app


def disabled_api_app() -> web.Application:
    """What ``/v1`` is without a tokens file: every path says the API is disabled."""

    async def disabled(request: web.Request) -> web.Response:
        return error(404, "admin API disabled", "pgveil has no admin.tokens_file configured, so /v1 accepts no call")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", disabled)
    return app


@dataclass(frozen=True, slots=True)
class AdminWiring:
    """What :func:`proxy.admin.app.build_admin_app` and ``start_admin_server`` are given for a config."""

    app_options: dict[str, Any]
    ssl_context: ssl.SSLContext | None


def admin_wiring(admin: AdminConfig, instance: services.Instance, metrics: AdminMetrics | None = None) -> AdminWiring:
    """The admin server's API, guards and TLS for ``admin``. Reads the tokens file: a missing or invalid one
    raises :class:`~proxy.errors.ConfigError`, so pgveil does not start with an API nobody can use."""
    from proxy.admin.app import admin_tls_context

    options: dict[str, Any] = {}
    if admin.tokens_file is None:
        options["api"] = disabled_api_app()
        log.info("admin API disabled: no admin.tokens_file")
    else:
        tokens = TokenFile(admin.tokens_file)
        guard = Guard(tokens, FailureLimiter(admin.auth_failure_limit, admin.auth_failure_window), metrics)
        options["api"] = build_api_app(instance, guard)
        if admin.require_token_for_metrics:
            options["metrics_guard"] = guard
        if admin.require_token_for_health:
            options["health_guard"] = guard
        log.info(
            "admin API enabled: %d tokens (%s)",
            len(tokens.tokens or ()),
            ", ".join(t.name for t in tokens.tokens or ()),
        )
    ssl_context = None
    if admin.tls is not None:
        try:
            ssl_context = admin_tls_context(admin.tls.cert_file, admin.tls.key_file, admin.tls.client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                [f"admin.tls: cannot load the certificate, key or client CA ({type(e).__name__})"]
            ) from None
    return AdminWiring(options, ssl_context)
