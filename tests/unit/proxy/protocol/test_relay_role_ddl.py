"""The relay tells the session when role DDL (which can change role membership) has completed and its
transaction has ended, so the policy runtime reads the membership again; other tags, and a transaction
still open, say nothing."""

from __future__ import annotations

import pytest

from proxy.encrypt.engine import CryptoContext, SessionCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import Relay, RolesChanged
from proxy.rewrite.catalog import Catalog


def be(*msgs: m.BackendMessage) -> bytes:
    return b"".join(codec.encode_backend(x) for x in msgs)


def started(with_crypto: bool = True) -> Relay:
    ctx = CryptoContext(Catalog({}), KeyRing(None))
    relay = Relay(
        crypto_factory=(lambda role: SessionCrypto(ctx, role)) if with_crypto else None, track_statements=True
    )
    relay.receive_client(codec.encode_startup(m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"),))))
    relay.receive_server(be(m.Authentication(m.AuthCode.OK), m.ReadyForQuery(b"I")))
    relay.events.clear()
    return relay


def roles_changed(relay: Relay) -> int:
    n = sum(isinstance(e, RolesChanged) for e in relay.events)
    relay.events.clear()
    return n


@pytest.mark.parametrize("tag", ["GRANT ROLE", "REVOKE ROLE", "CREATE ROLE", "DROP ROLE", "ALTER ROLE"])
def test_role_ddl_outside_a_transaction_is_reported_once(tag: str) -> None:
    relay = started()
    relay.receive_client(codec.encode_frontend(m.Query("-- role ddl")))
    relay.receive_server(be(m.CommandComplete(tag), m.ReadyForQuery(b"I")))
    assert roles_changed(relay) == 1
    relay.receive_client(codec.encode_frontend(m.Query("SELECT 1")))
    relay.receive_server(be(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    assert roles_changed(relay) == 0


def test_inside_a_transaction_it_waits_for_the_end() -> None:
    relay = started()
    relay.receive_client(codec.encode_frontend(m.Query("BEGIN; GRANT g TO u")))
    relay.receive_server(be(m.CommandComplete("BEGIN"), m.CommandComplete("GRANT ROLE"), m.ReadyForQuery(b"T")))
    assert roles_changed(relay) == 0
    relay.receive_client(codec.encode_frontend(m.Query("REVOKE g FROM u")))
    relay.receive_server(be(m.CommandComplete("REVOKE ROLE"), m.ReadyForQuery(b"T")))
    assert roles_changed(relay) == 0
    relay.receive_client(codec.encode_frontend(m.Query("COMMIT")))
    relay.receive_server(be(m.CommandComplete("COMMIT"), m.ReadyForQuery(b"I")))
    assert roles_changed(relay) == 1


@pytest.mark.parametrize("tag", ["GRANT", "REVOKE", "CREATE TABLE", "DROP TABLE", "ALTER TABLE", "DELETE 3"])
def test_other_tags_are_not_role_ddl(tag: str) -> None:
    relay = started()
    relay.receive_client(codec.encode_frontend(m.Query("-- other")))
    relay.receive_server(be(m.CommandComplete(tag), m.ReadyForQuery(b"I")))
    assert roles_changed(relay) == 0


def test_extended_protocol_execute_counts_too() -> None:
    relay = started()
    relay.receive_client(
        codec.encode_frontend(m.Parse("", "CREATE ROLE r", ()))
        + codec.encode_frontend(m.Bind("", "", (), (), ()))
        + codec.encode_frontend(m.Execute("", 0))
        + codec.encode_frontend(m.Sync())
    )
    relay.receive_server(
        be(m.ParseComplete(), m.BindComplete(), m.CommandComplete("CREATE ROLE"), m.ReadyForQuery(b"I"))
    )
    assert roles_changed(relay) == 1
