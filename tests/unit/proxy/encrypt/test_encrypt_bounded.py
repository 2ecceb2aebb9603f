"""Every exception becomes an ErrorResponse, and one message's work is bounded (issue 7, item 7): the
relay and the encryption layer with bytes in, bytes out.

- a parameter number no Bind can carry is refused before anything is sized by it;
- a statement longer than the inline limit is handed to the session for analysis off the event loop
  (AnalysisMiss holds the client, the delivered plan is used by the retry), one over the configured
  maximum is refused with 54000;
- an exception inside the encryption layer on a Query or Parse is an ERROR on a session that goes on;
  on a message no stand-in can replace, FATAL.
"""

from __future__ import annotations

import pickle

import pytest
from encrypt_support import CATALOG, SCORE_KEY, SSN_KEY, FakeKeySource, fe
from encrypt_support import split_frames as frames

from proxy.encrypt.engine import REFUSED_QUERY, CryptoContext, SessionCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import CloseConnection, NeedAnalysis, Phase, Relay

STARTUP = m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"), ("database", "app")))


def make(**ctx_options: int) -> tuple[Relay, CryptoContext]:
    ctx = CryptoContext(CATALOG, KeyRing(FakeKeySource([SSN_KEY, SCORE_KEY])), **ctx_options)
    relay = Relay(crypto_factory=lambda role: SessionCrypto(ctx, role))
    relay.receive_client(codec.encode_startup(STARTUP))
    relay.receive_server(
        b"".join(
            codec.encode_backend(x)
            for x in (
                m.Authentication(m.AuthCode.OK),
                m.ParameterStatus("client_encoding", "UTF8"),
                m.ReadyForQuery(b"I"),
            )
        )
    )
    relay.events.clear()
    relay.to_client.clear()
    relay.to_server.clear()
    return relay, ctx


def take(relay: Relay) -> tuple[bytes, bytes]:
    out = b"".join(relay.to_server), b"".join(relay.to_client)
    relay.to_server.clear()
    relay.to_client.clear()
    return out


def server_error(relay: Relay) -> bytes:
    """The server's answer to a failing stand-in, as it arrives; returns what the client gets."""
    relay.receive_server(
        codec.encode_backend(m.ErrorResponse(((b"S", "ERROR"), (b"C", "42601"), (b"M", "syntax error"))))
        + codec.encode_backend(m.ReadyForQuery(b"I"))
    )
    return take(relay)[1]


def error_fields(data: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for t, body in frames(data):
        if t == ord("E"):
            e = codec.decode_backend(t, body)
            assert isinstance(e, m.ErrorResponse)
            out.append((e.severity, e.sqlstate))
    return out


@pytest.mark.parametrize(
    ("number", "sqlstate"),
    # Beyond Int32 libpg_query's grammar (newer than the server's) rejects the text: refused unparsed.
    [(65536, "42P02"), (2147483647, "42P02"), (99999999999, "0A000")],
)
def test_parameter_numbers_beyond_what_a_bind_carries_are_refused(number: int, sqlstate: str) -> None:
    relay, _ctx = make()
    relay.receive_client(fe(m.Parse("", f"INSERT INTO customers (id, ssn) VALUES ($1, ${number})", ()), m.Sync()))
    to_server, _ = take(relay)
    parse = codec.decode_frontend(*frames(to_server)[0])
    assert isinstance(parse, m.Parse)
    assert parse.query == REFUSED_QUERY
    assert parse.param_types == ()
    assert len(to_server) < 200  # nothing was sized by the parameter number
    relay.receive_server(
        codec.encode_backend(m.ErrorResponse(((b"S", "ERROR"), (b"C", "42601"), (b"M", "syntax error"))))
        + codec.encode_backend(m.ReadyForQuery(b"I"))
    )
    to_client = take(relay)[1]
    assert error_fields(to_client) == [("ERROR", sqlstate)]
    assert relay.phase is Phase.READY


def test_the_highest_bindable_parameter_is_accepted() -> None:
    relay, _ctx = make()
    relay.receive_client(fe(m.Parse("", "INSERT INTO customers (id, ssn) VALUES ($1, $65535)", ())))
    parse = codec.decode_frontend(*frames(take(relay)[0])[0])
    assert isinstance(parse, m.Parse)
    assert len(parse.param_types) == 65535


def run_detached(relay: Relay) -> int:
    """Does what the session does for each NeedAnalysis (the work crosses to the worker pickled);
    returns how many there were."""
    count = 0
    while relay.events:
        (event,) = relay.events
        assert isinstance(event, NeedAnalysis)
        relay.events.clear()
        assert take(relay) == (b"", b"")  # held: nothing of it, or of what follows, passed on
        miss = event.miss
        miss.deliver(pickle.loads(pickle.dumps(miss.function(*pickle.loads(pickle.dumps(miss.arguments))))))
        relay.resume("client")
        count += 1
    return count


def test_a_long_statement_is_analysed_off_the_event_loop() -> None:
    relay, _ctx = make(inline_analysis_limit=100)
    sql = "INSERT INTO customers (id, ssn) VALUES (1, 'a') /*" + "x" * 200 + "*/"
    message = fe(m.Query(sql))
    relay.receive_client(message + fe(m.Query("SELECT 2")))
    assert run_detached(relay) == 2  # the reading check, then the analysis
    to_server, _ = take(relay)
    sent = [codec.decode_frontend(*f) for f in frames(to_server)]
    assert isinstance(sent[0], m.Query)
    assert "'a'" not in sent[0].query  # the literal was sealed with the delivered plan
    assert sent[1] == m.Query("SELECT 2")
    assert relay.events == []


def test_a_long_statement_that_names_no_protected_table_passes_untouched() -> None:
    relay, _ctx = make(inline_analysis_limit=100)
    message = fe(m.Query("SELECT 1 /*" + "x" * 200 + "*/"))
    relay.receive_client(message)
    assert run_detached(relay) == 2  # even finding that out reads the whole text: in the worker
    assert take(relay)[0] == message
    relay.receive_server(
        codec.encode_backend(m.CommandComplete("SELECT 1")) + codec.encode_backend(m.ReadyForQuery(b"I"))
    )
    take(relay)
    relay.receive_client(message)  # answered, so read with the same certainty: reading and plan are kept
    assert relay.events == []
    assert take(relay)[0] == message


def test_a_long_statement_with_a_backslash_is_checked_off_the_event_loop_then_passes() -> None:
    relay, _ctx = make(inline_analysis_limit=100)
    relay.receive_client(fe(m.Query("SELECT 1")))
    take(relay)  # unanswered: the next statement's reading is not certain
    message = fe(m.Query("SELECT E'\\\\' /*" + "x" * 200 + "*/"))
    relay.receive_client(message)
    assert run_detached(relay) == 2  # the reading check, then the analysis (which finds no protected table)
    assert take(relay)[0] == message


def test_a_long_statement_read_differently_by_the_server_is_refused() -> None:
    relay, _ctx = make(inline_analysis_limit=100)
    relay.receive_client(fe(m.Query("SET standard_conforming_strings = off")))
    take(relay)
    relay.receive_client(fe(m.Query("SELECT 'a\\' /* ' ; INSERT INTO customers (ssn) VALUES ('x') -- */" + " " * 200)))
    assert run_detached(relay) == 1
    (query,) = [codec.decode_frontend(*f) for f in frames(take(relay)[0])]
    assert query == m.Query(REFUSED_QUERY)


def test_a_failed_analysis_refuses_the_statement() -> None:
    relay, _ctx = make(inline_analysis_limit=100)
    relay.receive_client(fe(m.Query("SELECT ssn FROM customers /*" + "x" * 200 + "*/")))
    (event,) = relay.events
    assert isinstance(event, NeedAnalysis)
    relay.events.clear()
    event.miss.deliver(RuntimeError("worker died"))
    relay.resume("client")
    (query,) = [codec.decode_frontend(*f) for f in frames(take(relay)[0])]
    assert query == m.Query(REFUSED_QUERY)
    assert error_fields(server_error(relay)) == [("ERROR", "0A000")]


def test_a_statement_over_the_maximum_is_refused_without_analysis() -> None:
    relay, _ctx = make(inline_analysis_limit=100, max_analyzed_statement=1000)
    relay.receive_client(fe(m.Query("/* customers */ SELECT 1" + " " * 2000)))
    assert run_detached(relay) == 2  # read (nothing to lex), then found to name a protected table
    (query,) = [codec.decode_frontend(*f) for f in frames(take(relay)[0])]
    assert query == m.Query(REFUSED_QUERY)
    assert error_fields(server_error(relay)) == [("ERROR", "54000")]


def test_an_exception_in_the_encryption_layer_on_a_query_is_an_error_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay, _ctx = make()
    assert relay.crypto is not None

    def broken(sql: str) -> object:
        raise KeyError("a value that must not be logged")

    monkeypatch.setattr(relay.crypto, "query", broken)
    relay.receive_client(fe(m.Query("SELECT ssn FROM customers")))
    (query,) = [codec.decode_frontend(*f) for f in frames(take(relay)[0])]
    assert query == m.Query(REFUSED_QUERY)
    assert error_fields(server_error(relay)) == [("ERROR", "XX000")]
    monkeypatch.undo()
    relay.receive_client(fe(m.Query("SELECT 1")))
    assert take(relay)[0] == fe(m.Query("SELECT 1"))


def test_an_exception_on_a_message_without_a_stand_in_ends_the_session_with_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay, _ctx = make()
    assert relay.crypto is not None

    def broken(states: object) -> None:
        raise ValueError("bug")

    monkeypatch.setattr(relay.crypto, "describe_portal", broken)
    relay.receive_client(fe(m.Describe(b"P", "p1")))
    to_server, to_client = take(relay)
    assert to_server == b""
    assert error_fields(to_client) == [("FATAL", "XX000")]
    assert relay.phase is Phase.CLOSED
    assert [type(e) for e in relay.events] == [CloseConnection]


def test_a_statement_over_the_maximum_that_would_need_lexing_is_refused() -> None:
    relay, _ctx = make(inline_analysis_limit=100, max_analyzed_statement=1000)
    relay.receive_client(fe(m.Query("SELECT 'a\\b' /* no protected table */" + " " * 2000)))
    assert run_detached(relay) == 1
    (query,) = [codec.decode_frontend(*f) for f in frames(take(relay)[0])]
    assert query == m.Query(REFUSED_QUERY)
    assert error_fields(server_error(relay)) == [("ERROR", "54000")]


def test_a_statement_over_the_maximum_that_needs_neither_passes() -> None:
    relay, _ctx = make(inline_analysis_limit=100, max_analyzed_statement=1000)
    message = fe(m.Query("SELECT 1 /* no protected table */" + " " * 2000))
    relay.receive_client(message)
    assert run_detached(relay) == 2
    assert take(relay)[0] == message
