"""The proxy's error hierarchy.

Every leaf carries the SQLSTATE it is reported with, so the session turns any error into an
ErrorResponse without a lookup table. Messages never contain row data, parameters, literals or keys.

A refusal (the proxy answers a statement with an error instead of letting it reach the server as sent)
also carries a :class:`RefusalReason`, the label of ``pgveil_statements_refused_total``: a class sets
its default, a raise site may pass ``reason=``; anything unset counts as ``other``.
"""

from __future__ import annotations

from enum import StrEnum


class RefusalReason(StrEnum):
    """Why pgveil refused a statement. A fixed set: these are metric label values."""

    CONSTRUCT = "construct"  # a protected column used in a way pgveil cannot rewrite safely
    LEXING = "lexing"  # pgveil cannot read the SQL text exactly as the server does (settings, encoding)
    NAME_RESOLUTION = "name_resolution"  # a name that could resolve to a protected relation
    STALE_CATALOG = "stale_catalog"  # a protected relation changed; its catalog is being reloaded
    STATEMENT_STATE = "statement_state"  # a statement or portal whose server-side state is not known
    LIMITS = "limits"  # beyond a protocol limit or a documented size
    NOT_READY = "not_ready"  # the catalog or the keys are not loaded yet
    ENCODING = "encoding"  # a client or COPY encoding pgveil cannot read or produce safely
    VALUE = "value"  # a value bound for a protected column that its type refuses
    KEY_UNAVAILABLE = "key_unavailable"  # the keystore or key provider cannot supply a key
    POLICY_DENIED = "policy_denied"  # the login role may not use the column like this
    SHREDDED_SUBJECT = "shredded_subject"  # a write for a data subject whose keys are destroyed
    AUDIT_ANOMALY = "audit_anomaly"  # an access-audit anomaly rule stops the role's plaintext reads
    OTHER = "other"


class ProxyError(Exception):
    """Root of every error the proxy reports to a client."""

    sqlstate: str = "XX000"
    severity: str = "ERROR"
    reason: RefusalReason = RefusalReason.OTHER

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        reason: RefusalReason | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        if reason is not None:
            self.reason = reason


class ProtocolViolation(ProxyError):
    """A peer broke the wire protocol. ``peer`` says which one ("client" or "server")."""

    sqlstate = "08P01"
    severity = "FATAL"

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"protocol violation by {peer}: {message}")
        self.peer = peer


class UpstreamUnavailable(ProxyError):
    """The PostgreSQL server could not be reached or went away."""

    sqlstate = "08006"
    severity = "FATAL"


class ConfigError(ProxyError):
    """A configuration file or value is invalid; ``errors`` holds one line per problem."""

    sqlstate = "F0000"

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration: " + "; ".join(errors))
        self.errors = errors


class FeatureNotSupported(ProxyError):
    """A statement uses a protected column in a way the proxy cannot handle safely."""

    sqlstate = "0A000"
    reason = RefusalReason.CONSTRUCT


class AdminShutdown(ProxyError):
    """The proxy is shutting down and ends the session."""

    sqlstate = "57P01"
    severity = "FATAL"
