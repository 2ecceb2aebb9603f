"""Property: pgveil's model of prepared statements and portals follows the server's replies, and no Bind
reaches the server under a state the server does not have.

Random sequences of Parse, Bind, Close, Sync and SQL-level DEALLOCATE / DISCARD ALL / EXECUTE go through
the relay as bytes, pipelined: replies are delivered at random points, so messages are often sent before
earlier ones are answered. A small reference server applies the messages the relay forwards, as
PostgreSQL does (duplicate names fail with 42P05, an error skips everything up to Sync, Close of an
unknown name succeeds, a simple Query destroys the unnamed statement, random failures of Parse and Bind),
and answers them. After every reply the relay's statements, portals and crypto states must equal the
reference's at that reply; every Bind the reference runs on the protected INSERT must carry sealed
values, and every Bind on the plain statement the values as the client sent them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from encrypt_support import CATALOG, SCORE, SCORE_KEY, SSN, SSN_KEY, FakeKeySource, be, fe
from encrypt_support import split_frames as frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgmt.envelope import column_associated_data, open_envelope
from proxy.encrypt.engine import REFUSED_QUERY, CryptoContext, SessionCrypto, StatementCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import Phase, Relay

CANARY = b"CANARY-statement-state"
PROTECTED = "INSERT INTO customers (id, ssn, score) VALUES ($1, $2, $3)"
PLAIN = "SELECT $1::text, $2::text, $3::text"
QUERIES = {
    "protected": PROTECTED,
    "plain": PLAIN,
    "bad": "SELEC 1, 2, 3",  # the server rejects it
    "refused": "SELECT ssn FROM customers ORDER BY ssn",  # pgveil refuses it
}
NAMES = ("", "a", "b")
PARAMS = (b"7", CANARY, b"1")
KEYS = {bytes(k.key_id): k for k in (SSN_KEY, SCORE_KEY)}


def error(sqlstate: str) -> bytes:
    return codec.encode_error("ERROR", sqlstate, "reference server error")


@dataclass
class Snapshot:
    statements: dict[str, str]  # name -> "protected" | "plain"
    portals: set[str]


@dataclass
class ReferenceServer:
    """Applies frontend messages as PostgreSQL does and queues each reply with the state after it."""

    failures: deque[bool] = field(default_factory=deque)  # per Parse/Bind, in order: fail for another reason
    statements: dict[str, str] = field(default_factory=dict)
    portals: set[str] = field(default_factory=set)
    skipping: bool = False
    replies: deque[tuple[bytes, Snapshot]] = field(default_factory=deque)
    binds_checked: int = 0

    def reply(self, data: bytes) -> None:
        self.replies.append((data, Snapshot(dict(self.statements), set(self.portals))))

    def fail(self) -> None:
        self.reply(error("XX000"))
        self.skipping = True

    def receive(self, data: bytes) -> None:
        for t, body in frames(data):
            msg = codec.decode_frontend(t, body)
            if isinstance(msg, m.Sync):
                self.skipping = False
                self.portals.clear()  # no transaction block is ever open: each Sync ends its transaction
                self.reply(be(m.ReadyForQuery(b"I")))
            elif isinstance(msg, m.Query):
                self.query(msg.query)
            elif self.skipping:
                if isinstance(msg, m.Parse | m.Bind):
                    self.failures.popleft()
            elif isinstance(msg, m.Parse):
                self.parse(msg)
            elif isinstance(msg, m.Bind):
                self.bind(msg)
            elif isinstance(msg, m.Close):
                if msg.kind == b"S":
                    self.statements.pop(msg.name, None)
                else:
                    self.portals.discard(msg.name)
                self.reply(be(m.CloseComplete()))
            else:
                raise AssertionError(f"unexpected {msg!r}")

    def parse(self, msg: m.Parse) -> None:
        fails = self.failures.popleft()
        if not msg.statement:
            self.statements.pop("", None)  # before parsing, so even when the Parse fails
        if msg.query not in (PROTECTED, PLAIN):
            self.reply(error("42601"))  # the bad query, and the stand-in of a refused one
            self.skipping = True
        elif msg.statement and msg.statement in self.statements:
            self.reply(error("42P05"))
            self.skipping = True
        elif fails:
            self.fail()
        else:
            self.statements[msg.statement] = "protected" if msg.query == PROTECTED else "plain"
            self.reply(be(m.ParseComplete()))

    def bind(self, msg: m.Bind) -> None:
        fails = self.failures.popleft()
        kind = self.statements.get(msg.statement)
        if kind is None or fails:
            # After a failed Bind the unnamed portal can no longer run: the server skips to Sync, and Sync
            # ends the transaction. The model may drop it.
            self.portals.discard(msg.portal)
        if kind is None:
            self.reply(error("26000"))  # also the stand-in of a refused Bind
            self.skipping = True
            return
        self.binds_checked += 1
        if kind == "protected":
            # Sealed for the statement the server has: each value opens under its column's key.
            assert msg.params[1] is not None
            assert msg.params[2] is not None
            assert open_envelope(KEYS.__getitem__, msg.params[1], column_associated_data(SSN.column_id)) == CANARY
            assert open_envelope(KEYS.__getitem__, msg.params[2], column_associated_data(SCORE.column_id))
        else:
            assert msg.params == PARAMS, "a Bind of the plain statement was rewritten"
        if fails:
            self.fail()
            return
        self.portals.add(msg.portal)
        self.reply(be(m.BindComplete()))

    def query(self, sql: str) -> None:
        # A simple Query destroys the unnamed statement, and its portals end with it.
        self.statements.pop("", None)
        self.portals.discard("")
        if sql in ("DEALLOCATE ALL", "DISCARD ALL"):
            self.statements.clear()
            self.reply(be(m.CommandComplete(sql)))
        elif sql.startswith("DEALLOCATE "):
            name = sql.split()[1]
            if name in self.statements:
                del self.statements[name]
                self.reply(be(m.CommandComplete("DEALLOCATE")))
            else:
                self.reply(error("26000"))
        elif sql.startswith("EXECUTE "):
            name = sql.split()[1].split("(")[0]
            kind = self.statements.get(name)
            assert kind != "protected", "SQL-level EXECUTE with plaintext arguments ran the protected INSERT"
            self.reply(be(m.CommandComplete("SELECT 1")) if kind else error("26000"))
        else:
            assert sql == REFUSED_QUERY, sql
            self.reply(error("42601"))
        self.reply(be(m.ReadyForQuery(b"I")))


def make_relay() -> tuple[Relay, SessionCrypto]:
    ctx = CryptoContext(CATALOG, KeyRing(FakeKeySource([SSN_KEY, SCORE_KEY])))
    sessions: list[SessionCrypto] = []

    def factory(role: str) -> SessionCrypto:
        sessions.append(SessionCrypto(ctx, role))
        return sessions[-1]

    relay = Relay(crypto_factory=factory)
    relay.receive_client(codec.encode_startup(m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"),))))
    relay.receive_server(
        be(m.Authentication(m.AuthCode.OK), m.ParameterStatus("client_encoding", "UTF8"), m.ReadyForQuery(b"I"))
    )
    relay.to_client.clear()
    relay.events.clear()
    return relay, sessions[0]


Step = tuple[str, str, str, bool]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("parse"), st.sampled_from(NAMES), st.sampled_from(sorted(QUERIES)), st.booleans()),
        st.tuples(st.just("bind"), st.sampled_from(NAMES), st.just(""), st.booleans()),
        st.tuples(st.just("close"), st.sampled_from(NAMES), st.sampled_from(["S", "P"]), st.just(False)),
        st.tuples(st.just("sync"), st.just(""), st.just(""), st.just(False)),
        st.tuples(st.just("deliver"), st.sampled_from(["1", "2", "all"]), st.just(""), st.just(False)),
        st.tuples(
            st.just("query"),
            st.sampled_from(["DEALLOCATE a", "DEALLOCATE b", "DEALLOCATE ALL", "DISCARD ALL", "EXECUTE a(1, 'x', 2)"]),
            st.just(""),
            st.just(False),
        ),
    ),
    max_size=40,
)


def check(relay: Relay, crypto: SessionCrypto, snap: Snapshot) -> None:
    assert relay.phase is Phase.READY
    assert set(relay.statements) == set(snap.statements)
    assert set(relay.portals) == snap.portals
    for name, kind in snap.statements.items():
        assert isinstance(crypto.statement_state(name), StatementCrypto) == (kind == "protected"), name
    for name in NAMES:
        if name not in snap.statements:
            assert crypto.statement_state(name) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_the_statement_model_follows_the_server(script: list[Step]) -> None:
    relay, crypto = make_relay()
    ref = ReferenceServer()
    refused_while_certain = 0
    open_segment = False

    def send(msg: m.FrontendMessage, fails: bool = False) -> None:
        if isinstance(msg, m.Parse | m.Bind):
            ref.failures.append(fails)
        relay.receive_client(fe(msg))
        out = b"".join(relay.to_server)
        relay.to_server.clear()
        ref.receive(out)

    def deliver(n: int) -> None:
        for _ in range(n):
            if not ref.replies:
                return
            data, snap = ref.replies.popleft()
            relay.receive_server(data)
            relay.to_client.clear()
            check(relay, crypto, snap)

    for action, a, b, fails in script:
        if action == "parse":
            send(m.Parse(a, QUERIES[b], ()), fails)
            open_segment = True
        elif action == "bind":
            certain = not relay.pending and a in relay.statements and not ref.skipping
            before = ref.binds_checked
            send(m.Bind("", a, (), PARAMS, ()), fails)
            if certain and ref.binds_checked == before:
                refused_while_certain += 1
            open_segment = True
        elif action == "close":
            send(m.Close(b.encode(), a))
            open_segment = True
        elif action == "sync":
            send(m.Sync())
            open_segment = False
        elif action == "deliver":
            deliver(len(ref.replies) if a == "all" else int(a))
        else:
            if open_segment:  # the server ignores a Query after an error until Sync
                send(m.Sync())
                open_segment = False
            send(m.Query(a))
    send(m.Sync())
    deliver(len(ref.replies))
    assert not relay.pending
    # Never refused where nothing was in doubt: the statement was confirmed and nothing unanswered.
    assert refused_while_certain == 0
