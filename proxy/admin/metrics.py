"""The proxy's Prometheus metrics: one :class:`Metrics` object per process, on a registry of its own.

Owns every metric name, its help text and its label values, and the cheap methods the rest of the proxy
calls to move them. It must not be called per protocol message: sessions count in plain ints and flush
once per socket read (:meth:`Metrics.add_relayed`), because each prometheus call takes a lock.
Process-wide counters that already live as plain ints (the key cache, the keystore's notification
refreshes, the SQL analysis cache) are read at scrape time by a collector (:meth:`Metrics.watch_encryption`),
so they cost the data path nothing and never drift from their source.

Label values come only from small fixed sets (directions, peers, TLS legs, refusal reasons, SQLSTATE
classes from PostgreSQL's Appendix A), never from users, databases, addresses, queries or full
SQLSTATEs, so the number of series is bounded whatever clients and servers send.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from keymgmt import native
from keymgmt.keystore import UNWRAP_BUCKETS, ProviderCalls
from proxy import __version__, logsetup
from proxy.errors import RefusalReason

log = logging.getLogger(__name__)

Direction = Literal["client_to_server", "server_to_client"]
Peer = Literal["client", "server"]
ErrorSource = Literal["proxy", "server"]

DIRECTIONS: Final[tuple[Direction, ...]] = ("client_to_server", "server_to_client")
PEERS: Final[tuple[Peer, ...]] = ("client", "server")
# What a value governed by the visibility policy came back as (``match`` is served masked).
SERVED_OUTCOMES: Final[frozenset[str]] = frozenset({"plaintext", "masked", "hidden", "ciphertext"})
_OUTCOME_ALIASES: Final = {"match": "masked"}
DEFAULT_ROLE_LABEL: Final = "default"


# What the collector reads at scrape time: read-only views of the encryption runtime's plain counters.
class _KeyCacheCounters(Protocol):
    @property
    def evictions(self) -> int: ...
    @property
    def expirations(self) -> int: ...
    @property
    def invalidations(self) -> int: ...
    @property
    def flushes(self) -> int: ...


class _KeystoreCounters(Protocol):
    @property
    def cache(self) -> _KeyCacheCounters: ...
    @property
    def notifications(self) -> int: ...
    @property
    def refreshes(self) -> int: ...
    @property
    def refresh_failures(self) -> int: ...
    @property
    def provider_calls(self) -> ProviderCalls: ...


class _KeyRingCounters(Protocol):
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...


class _AnalysisCounters(Protocol):
    @property
    def cache_hits(self) -> int: ...
    @property
    def cache_misses(self) -> int: ...


class _MembershipCounters(Protocol):
    @property
    def membership_reads(self) -> int: ...
    @property
    def membership_read_failures(self) -> int: ...
    @property
    def membership_changes(self) -> int: ...


class EncryptionSource(Protocol):
    """The process's encryption runtime, as the metrics see it (keystore None until it is loaded)."""

    @property
    def keyring(self) -> _KeyRingCounters: ...
    @property
    def context(self) -> _AnalysisCounters: ...
    @property
    def keystore(self) -> _KeystoreCounters | None: ...


# PostgreSQL docs, Appendix A "PostgreSQL Error Codes": every class the server can send. Anything else
# (a broken server, a buggy middlebox) is counted as "other" so a peer cannot mint label values.
SQLSTATE_CLASSES: Final[frozenset[str]] = frozenset(
    {
        "00", "01", "02", "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "10", "20", "21",
        "22", "23", "24", "25", "26", "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B", "3D",
        "3F", "40", "42", "44", "53", "54", "55", "57", "58", "72", "F0", "HV", "P0", "XX",
    }
)  # fmt: skip
OTHER_SQLSTATE_CLASS: Final = "other"

# Upstream connects range from a loopback handshake (well under a millisecond) to a TLS connect across
# regions or a server at max_connections retrying (seconds); 10 s is where clients give up.
UPSTREAM_CONNECT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Sessions last from one short request to a pooled connection that lives for hours.
SESSION_DURATION_BUCKETS: Final = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


def sqlstate_class(sqlstate: str) -> str:
    """The label value for ``sqlstate``: its two-character class if PostgreSQL defines it, else "other"."""
    cls = sqlstate[:2]
    return cls if len(sqlstate) == 5 and cls in SQLSTATE_CLASSES else OTHER_SQLSTATE_CLASS


class Metrics:
    """Every metric of one proxy process, on a private registry (tests and embedders can make several)."""

    def __init__(self, version: str = __version__, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What /metrics shows: this registry, or a view that adds worker processes' samples to it.
        self.exposed: Any = self.registry
        r = self.registry
        if process_metrics:
            # The standard process_* and python_* series operators expect from any Prometheus target.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # implementation: "native" (the compiled accelerator) or "python", see keymgmt.native.
        self.build_info = Gauge(
            "pgveil_build_info", "pgveil build; the value is always 1.", ["version", "implementation"], registry=r
        )
        self.build_info.labels(version, native.IMPLEMENTATION).set(1)
        log.info("pgveil %s, envelope and DataRow kernels: %s", version, native.describe())

        # -- sessions -----------------------------------------------------------------------------------
        self.sessions_active = Gauge("pgveil_sessions_active", "Client sessions open now.", registry=r)
        self.sessions = Counter("pgveil_sessions_total", "Client sessions accepted.", registry=r)
        # Only with sessions.workers > 1; label values are process numbers below that setting's bound.
        self.process_sessions = Gauge(
            "pgveil_process_sessions",
            "Client sessions open now per serving process (0: the supervisor, 1..: its workers).",
            ["process"],
            registry=r,
        )
        self.session_duration = Histogram(
            "pgveil_session_duration_seconds",
            "Time from accepting a client connection to closing it.",
            buckets=SESSION_DURATION_BUCKETS,
            registry=r,
        )

        # -- relay --------------------------------------------------------------------------------------
        self.relayed_bytes = Counter(
            "pgveil_relayed_bytes_total",
            "Bytes received from one peer to relay to the other.",
            ["direction"],
            registry=r,
        )
        self.relayed_messages = Counter(
            "pgveil_relayed_messages_total",
            "Protocol messages received from one peer to relay to the other.",
            ["direction"],
            registry=r,
        )
        self.backpressure_pauses = Counter(
            "pgveil_backpressure_pauses_total",
            "Times reading from one peer paused because the other peer was not draining its writes.",
            ["direction"],
            registry=r,
        )
        # Pre-bound children: a labels() lookup per call would cost a hash and a lock on the hot path.
        self._relayed = {d: (self.relayed_bytes.labels(d), self.relayed_messages.labels(d)) for d in DIRECTIONS}
        self._backpressure = {d: self.backpressure_pauses.labels(d) for d in DIRECTIONS}

        # -- upstream -----------------------------------------------------------------------------------
        self.upstream_connect = Histogram(
            "pgveil_upstream_connect_seconds",
            "Time to open a connection to the PostgreSQL server, TLS included.",
            buckets=UPSTREAM_CONNECT_BUCKETS,
            registry=r,
        )
        self.upstream_connect_failures = Counter(
            "pgveil_upstream_connect_failures_total", "Failed attempts to connect to the PostgreSQL server.", registry=r
        )

        # -- errors and protocol ------------------------------------------------------------------------
        self.errors = Counter(
            "pgveil_errors_total",
            "ErrorResponses sent to clients, by SQLSTATE class and by who raised them.",
            ["sqlstate_class", "source"],
            registry=r,
        )
        self.protocol_violations = Counter(
            "pgveil_protocol_violations_total",
            "Sessions ended because a peer broke the protocol.",
            ["peer"],
            registry=r,
        )
        self._violations = {p: self.protocol_violations.labels(p) for p in PEERS}
        self.cancel_requests = Counter(
            "pgveil_cancel_requests_total", "CancelRequests forwarded to the server.", registry=r
        )
        self.tls_sessions = Counter(
            "pgveil_tls_sessions_total", "TLS handshakes completed, by leg.", ["leg"], registry=r
        )
        self._tls = {p: self.tls_sessions.labels(p) for p in PEERS}

        # -- configuration ------------------------------------------------------------------------------
        self.config_reloads = Counter(
            "pgveil_config_reloads_total", "Configuration reloads, by result.", ["result"], registry=r
        )
        self._reload_ok = self.config_reloads.labels("success")
        self._reload_failed = self.config_reloads.labels("failure")
        self.policy_reloads = Counter(
            "pgveil_policy_reloads_total",
            "Reloads of the visibility policy (roles:), by result; a rejected one leaves the running policy.",
            ["result"],
            registry=r,
        )
        self._policy_ok = self.policy_reloads.labels("success")
        self._policy_failed = self.policy_reloads.labels("failure")

        # -- SQL analysis and encryption ----------------------------------------------------------------
        self.statements_refused = Counter(
            "pgveil_statements_refused_total",
            "Statements (and COPY streams) the proxy refused instead of letting them reach the server as sent, "
            "by reason and by the SQLSTATE class of the error the client got.",
            ["reason", "sqlstate_class"],
            registry=r,
        )
        self.values_encrypted = Counter(
            "pgveil_values_encrypted_total", "Column values encrypted before reaching the server.", registry=r
        )
        self.values_decrypted = Counter(
            "pgveil_values_decrypted_total", "Column values decrypted for a client.", registry=r
        )
        self.decrypt_failures = Counter(
            "pgveil_decrypt_failures_total",
            "Ciphertexts from the server that failed to decrypt (tampered, moved, or key missing).",
            registry=r,
        )
        self.shredded_reads = Counter(
            "pgveil_shredded_reads_total", "Values read whose data subject's keys were destroyed.", registry=r
        )
        self.values_served = Counter(
            "pgveil_values_served_total",
            "Values of governed columns sent to clients, by policy role (a role the policy names, or "
            "default) and by what they came back as.",
            ["role", "outcome"],
            registry=r,
        )
        self._policy_roles: frozenset[str] = frozenset()
        self._encryption: EncryptionSource | None = None
        self._membership: _MembershipCounters | None = None
        r.register(_EncryptionCollector(self))
        r.register(_LogLevelCollector())

    def watch_encryption(self, source: EncryptionSource | None) -> None:
        """The runtime whose key cache, keystore and analysis cache counters ``/metrics`` shows."""
        self._encryption = source

    def watch_membership(self, source: _MembershipCounters | None) -> None:
        """The policy runtime whose role-membership read counters ``/metrics`` shows."""
        self._membership = source

    def set_policy_roles(self, names: frozenset[str]) -> None:
        """The role names the running policy lists: the only ``role`` label values besides default."""
        self._policy_roles = frozenset(names)

    def role_label(self, role: str) -> str:
        return role if role in self._policy_roles else DEFAULT_ROLE_LABEL

    # -- cheap methods for the data path ---------------------------------------------------------------
    def session_started(self) -> None:
        self.sessions.inc()
        self.sessions_active.inc()

    def set_process_sessions(self, counts: dict[int, int]) -> None:
        for process, n in counts.items():
            self.process_sessions.labels(process=str(process)).set(n)

    def session_ended(self, duration_seconds: float) -> None:
        self.sessions_active.dec()
        self.session_duration.observe(duration_seconds)

    def add_relayed(self, direction: Direction, nbytes: int, nmessages: int) -> None:
        """Flushes one batch (one socket read) of relay counters; zero counts cost nothing."""
        nbytes_counter, nmessages_counter = self._relayed[direction]
        if nbytes:
            nbytes_counter.inc(nbytes)
        if nmessages:
            nmessages_counter.inc(nmessages)

    def backpressure_paused(self, direction: Direction) -> None:
        self._backpressure[direction].inc()

    def upstream_connected(self, seconds: float) -> None:
        self.upstream_connect.observe(seconds)

    def upstream_connect_failed(self, seconds: float | None = None) -> None:
        """Counts a failed connect; the attempt's duration, when known, also feeds the connect histogram."""
        self.upstream_connect_failures.inc()
        if seconds is not None:
            self.upstream_connect.observe(seconds)

    def error_sent(self, sqlstate: str, source: ErrorSource) -> None:
        self.errors.labels(sqlstate_class(sqlstate), source).inc()

    def protocol_violation(self, peer: Peer) -> None:
        self._violations[peer].inc()

    def cancel_request(self) -> None:
        self.cancel_requests.inc()

    def tls_session(self, leg: Peer) -> None:
        self._tls[leg].inc()

    def config_reloaded(self, ok: bool) -> None:
        (self._reload_ok if ok else self._reload_failed).inc()

    def policy_reloaded(self, ok: bool) -> None:
        (self._policy_ok if ok else self._policy_failed).inc()

    def add_served(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Flushes a session's served values since the last flush: (role label, outcome) -> count. A role
        the running policy does not list counts as default (the policy may have been reloaded since
        the session counted); an outcome outside the fixed set is a bug and is not exported."""
        for (role, outcome), n in counts.items():
            outcome = _OUTCOME_ALIASES.get(outcome, outcome)
            if n and outcome in SERVED_OUTCOMES:
                self.values_served.labels(self.role_label(role), outcome).inc(n)

    def statement_refused(self, reason: RefusalReason, sqlstate: str, n: int = 1) -> None:
        reason = reason if reason in _REASONS else RefusalReason.OTHER
        self.statements_refused.labels(reason.value, sqlstate_class(sqlstate)).inc(n)

    def add_refusals(self, counts: Mapping[tuple[RefusalReason, str], int]) -> None:
        """Flushes a session's refusals since the last flush: (reason, SQLSTATE) -> count."""
        for (reason, sqlstate), n in counts.items():
            if n:
                self.statement_refused(reason, sqlstate, n)

    def add_values(
        self, *, encrypted: int = 0, decrypted: int = 0, decrypt_failures: int = 0, shredded: int = 0
    ) -> None:
        """Flushes one batch of per-value counts (a DataRow batch, a Bind, a COPY chunk)."""
        if encrypted:
            self.values_encrypted.inc(encrypted)
        if decrypted:
            self.values_decrypted.inc(decrypted)
        if decrypt_failures:
            self.decrypt_failures.inc(decrypt_failures)
        if shredded:
            self.shredded_reads.inc(shredded)

    # -- exposition ------------------------------------------------------------------------------------
    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition payload and its content type; ``accept`` (the scraper's Accept header) may ask
        for OpenMetrics, otherwise it is the classic Prometheus text format."""
        encode, content_type = choose_encoder(accept)
        return encode(self.exposed), content_type


_REASONS: Final = frozenset(RefusalReason)


class _LogLevelCollector:
    """``pgveil_log_level_changes_total{source}``: this process's log level changes (proxy.logsetup), by a
    reload of ``logging.level`` (``reload``) or ``PUT /v1/logging`` (``api``)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "pgveil_log_level_changes",
            "Log level changes at runtime, by source: reload (SIGHUP, POST /v1/policy/reload), api (PUT /v1/logging).",
            labels=["source"],
        )
        changes = logsetup.level_changes()
        for source in ("reload", "api"):
            family.add_metric([source], float(changes.get(source, 0)))
        yield family


class _EncryptionCollector:
    """Reads the encryption runtime's counters when scraped; zeros until a runtime is watched, so every
    family exists from the start (and in every worker process alike)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        src = self._metrics._encryption
        keyring = src.keyring if src is not None else None
        context = src.context if src is not None else None
        keystore = src.keystore if src is not None else None
        cache = keystore.cache if keystore is not None else None

        def counter(name: str, documentation: str, value: int | None) -> CounterMetricFamily:
            return CounterMetricFamily(name, documentation, value=float(value or 0))

        yield counter(
            "pgveil_key_cache_hits",
            "Data key lookups by statements answered from the in-memory key cache.",
            keyring.hits if keyring is not None else None,
        )
        yield counter(
            "pgveil_key_cache_misses",
            "Data key lookups by statements that had to fetch the key from the keystore.",
            keyring.misses if keyring is not None else None,
        )
        evictions = CounterMetricFamily(
            "pgveil_key_cache_evictions",
            "Keys dropped from the key cache by its size bound (capacity) or its TTL (ttl).",
            labels=["cause"],
        )
        evictions.add_metric(["capacity"], float(cache.evictions if cache is not None else 0))
        evictions.add_metric(["ttl"], float(cache.expirations if cache is not None else 0))
        yield evictions
        yield counter(
            "pgveil_key_cache_invalidations",
            "Keys dropped from the key cache because their state changed in the keystore.",
            cache.invalidations if cache is not None else None,
        )
        yield counter(
            "pgveil_key_cache_flushes",
            "Times the whole key cache was dropped (key notifications lost or resumed, a failed refresh).",
            cache.flushes if cache is not None else None,
        )
        yield counter(
            "pgveil_key_notifications",
            "Notifications received on the keystore channel (hints to re-read key state, never commands).",
            keystore.notifications if keystore is not None else None,
        )
        refreshes = CounterMetricFamily(
            "pgveil_key_refreshes",
            "Re-reads of the cached keys' state from the keystore, coalesced and rate-limited, by result.",
            labels=["result"],
        )
        refreshes.add_metric(["success"], float(keystore.refreshes if keystore is not None else 0))
        refreshes.add_metric(["failure"], float(keystore.refresh_failures if keystore is not None else 0))
        yield refreshes
        calls = keystore.provider_calls if keystore is not None else ProviderCalls()
        errors = CounterMetricFamily(
            "pgveil_key_provider_errors",
            "Key provider calls that failed (a KEK unreachable, a token or file gone, a wrapped key that does not "
            "unwrap), by operation.",
            labels=["operation"],
        )
        for operation in ("wrap", "unwrap"):
            errors.add_metric([operation], float(calls.errors[operation]))
        yield errors
        cumulative, buckets = 0, []
        for bound, n in zip(UNWRAP_BUCKETS, calls.unwrap_buckets, strict=True):
            cumulative += n
            buckets.append((repr(bound), float(cumulative)))
        buckets.append(("+Inf", float(calls.calls["unwrap"])))
        yield HistogramMetricFamily(
            "pgveil_key_unwrap_seconds",
            "Time the key provider took to unwrap a data key (each keystore fetch of a key not in the cache).",
            buckets=buckets,
            sum_value=calls.unwrap_seconds,
        )
        membership = self._metrics._membership
        reads = CounterMetricFamily(
            "pgveil_role_membership_reads",
            "Reads of the role membership (pg_auth_members) over the service connection, by result.",
            labels=["result"],
        )
        reads.add_metric(["success"], float(membership.membership_reads if membership is not None else 0))
        reads.add_metric(["failure"], float(membership.membership_read_failures if membership is not None else 0))
        yield reads
        yield counter(
            "pgveil_role_membership_changes",
            "Reads of the role membership that found it changed (each one makes sessions re-decide).",
            membership.membership_changes if membership is not None else None,
        )
        yield counter(
            "pgveil_sql_analysis_cache_hits",
            "Statements whose analysis came from the cache.",
            context.cache_hits if context is not None else None,
        )
        yield counter(
            "pgveil_sql_analysis_cache_misses",
            "Statements parsed and analysed afresh.",
            context.cache_misses if context is not None else None,
        )


# -- the admin API's own counters (proxy.admin.api) -------------------------------------------------------
# Kept apart from Metrics: the admin server exists in the supervisor only. Label values are the fixed
# operation ids of proxy.admin.api.operations() plus the probes, and the few HTTP statuses the admin server
# answers with: never a path, a token name or an address.
class AdminMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pgveil_admin_requests_total",
            "Admin server requests by operation and HTTP status (401/403/429: refused by authentication).",
            ["operation", "status"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "pgveil_admin_auth_failures_total",
            "Admin requests with a token pgveil does not know or a malformed Authorization header.",
            registry=registry,
        )

    def request(self, operation: str, status: int) -> None:
        self.requests.labels(operation, str(status)).inc()

    def auth_failed(self) -> None:
        self.auth_failures.inc()
