"""TLS contexts for the two legs: client ⇄ pgveil (we are the server) and pgveil ⇄ PostgreSQL.

The legs are independent TLS sessions, which is why SCRAM channel binding (``-PLUS``) cannot be relayed.
Upstream modes follow libpq's ``sslmode`` names: ``disable`` (never), ``prefer`` (if the server offers it,
no verification), ``require`` (must, no verification unless a CA file is given, then the chain is verified
like libpq's ``verify-ca``), ``verify-full`` (chain and host name verified against the CA file).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class UpstreamTLS(Enum):
    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_FULL = "verify-full"


@dataclass(frozen=True, slots=True)
class UpstreamTLSSettings:
    mode: UpstreamTLS
    context: ssl.SSLContext | None
    server_hostname: str | None


def client_leg_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The context pgveil uses as a TLS server towards its clients."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def upstream_settings(mode: str, host: str, ca_file: Path | None, server_name: str | None) -> UpstreamTLSSettings:
    m = UpstreamTLS(mode)
    if m is UpstreamTLS.DISABLE:
        return UpstreamTLSSettings(m, None, None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if m is UpstreamTLS.VERIFY_FULL:
        if ca_file is None:
            raise ValueError("upstream.tls verify-full needs upstream.ca_file")
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return UpstreamTLSSettings(m, ctx, server_name or host)
    ctx.check_hostname = False
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    # Without verification the name only feeds SNI; with it, it is not checked (verify-ca semantics).
    return UpstreamTLSSettings(m, ctx, server_name or host)


def first_certificate_der(cert_file: Path) -> bytes | None:
    """The DER bytes of the first certificate in a PEM file (the leaf the client leg presents)."""
    pem = cert_file.read_text(encoding="ascii", errors="replace")
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        return None
    return ssl.PEM_cert_to_DER_cert(pem[begin : end + len("-----END CERTIFICATE-----")])
