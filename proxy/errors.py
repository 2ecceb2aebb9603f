"""The proxy's error hierarchy.

Every leaf carries the SQLSTATE it is reported with, so the session turns any error into an
ErrorResponse without a lookup table. Messages never contain row data, parameters, literals or keys.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Root of every error the proxy reports to a client."""

    sqlstate: str = "XX000"
    severity: str = "ERROR"

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


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


class AdminShutdown(ProxyError):
    """The proxy is shutting down and ends the session."""

    sqlstate = "57P01"
    severity = "FATAL"
