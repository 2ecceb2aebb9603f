"""The OpenAPI 3.1 document of the admin server, made from the operation table of :mod:`proxy.admin.api`.

Served at ``/v1/openapi.json``. Nothing is written by hand per route: a route added to
:func:`proxy.admin.api.operations` is documented, and a route removed there disappears from the document.
The unversioned endpoints of :mod:`proxy.admin.app` (``/metrics``, ``/healthz``, ``/readyz``) are
described here too, with their security optional (they are open unless the configuration protects them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from proxy import __version__
from proxy.admin.api import API_VERSION, AUTH_RESPONSES, Operation, Response
from proxy.admin.auth import Scope

ERROR_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what went wrong, in a few words"},
        "detail": {"type": "string", "description": "what to do about it"},
    },
}
_ERROR_REF: Final = {"$ref": "#/components/schemas/Error"}
_PARAM = re.compile(r"\{([^}:]+)\}")


def _response(r: Response) -> dict[str, Any]:
    schema = r.schema if r.schema is not None else _ERROR_REF
    return {"description": r.description, "content": {"application/json": {"schema": schema}}}


def _operation(op: Operation) -> dict[str, Any]:
    responses = {**AUTH_RESPONSES, **op.responses}
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": list(op.tags),
        "security": [{"bearer": [op.scope.value]}],
        "x-pgveil-scope": op.scope.value,
        "x-pgveil-mutating": op.mutating,
        "responses": {str(code): _response(r) for code, r in sorted(responses.items())},
    }
    if op.parameters:
        doc["parameters"] = [
            {"name": p.name, "in": "path", "required": True, "description": p.description, "schema": p.schema}
            for p in op.parameters
        ]
    if op.request_body is not None:
        doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": op.request_body}}}
    return doc


def _probe(summary: str, ok: dict[str, Any], *, unready: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    if unready:
        responses["503"] = {
            "description": "not ready",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
        }
    for code in (401, 403, 429, 503):
        responses.setdefault(str(code), _response(AUTH_RESPONSES[code]))
    return {
        "summary": summary,
        "tags": ["probes"],
        # Open by default; admin.require_token_for_metrics / _for_health ask for a metrics:read token.
        "security": [{}, {"bearer": [Scope.METRICS_READ.value]}],
        "x-pgveil-scope": Scope.METRICS_READ.value,
        "responses": responses,
    }


def versioned_path(op: Operation) -> str:
    return f"/{API_VERSION}{op.path}"


def build_document(ops: Sequence[Operation]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        params = set(_PARAM.findall(op.path))
        if params != {p.name for p in op.parameters}:
            raise ValueError(f"{op.operation_id}: path parameters {sorted(params)} are not all described")
        paths.setdefault(versioned_path(op), {})[op.method.lower()] = _operation(op)
    status = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}}
    paths["/metrics"] = {
        "get": _probe(
            "Prometheus metrics (text exposition, or OpenMetrics when asked for)",
            {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
        )
    }
    paths["/healthz"] = {"get": _probe("liveness: the process answers", {"description": "alive", **status})}
    paths["/readyz"] = {
        "get": _probe(
            "readiness: catalog and keys loaded, upstream answers", {"description": "ready", **status}, unready=True
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pgveil admin API",
            "version": __version__,
            "description": (
                "The admin API of a pgveil instance. Every /v1 operation needs a bearer token listed in "
                "admin.tokens_file with the operation's scope (x-pgveil-scope). See docs/admin-api.md."
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token whose SHA-256 is listed in admin.tokens_file; scopes: "
                    + ", ".join(s.value for s in Scope),
                }
            },
            "schemas": {
                "Error": ERROR_SCHEMA,
                "Status": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"type": "string"},
                        "reason": {"type": "string"},
                        "version": {"type": "string"},
                    },
                },
            },
        },
    }
