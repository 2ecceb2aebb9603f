"""CryptoContext.check_given_subject: a client-given subject id is refused (0A000) when the catalog reports a
BEFORE INSERT or UPDATE row trigger that could change it, and accepted otherwise."""

from __future__ import annotations

import pytest

from proxy.encrypt.engine import CryptoContext
from proxy.encrypt.keyring import KeyRing
from proxy.encrypt.subjectgen import ColumnDefault
from proxy.errors import ProxyError
from proxy.rewrite.catalog import Catalog, SubjectColumn

SUBJECT = SubjectColumn("customer", "id", "integer")


def _ctx(before_write_trigger: bool) -> CryptoContext:
    ctx = CryptoContext(Catalog({}), KeyRing(None))
    default = ColumnDefault(None, before_write_trigger=before_write_trigger)
    ctx.install(Catalog({}), subject_defaults={"public.people": default})
    return ctx


def test_a_before_row_trigger_refuses_a_given_subject() -> None:
    with pytest.raises(ProxyError) as refused:
        _ctx(True).check_given_subject("public.people", SUBJECT)
    assert refused.value.sqlstate == "0A000"
    assert "public.people" in str(refused.value)
    assert "BEFORE INSERT or UPDATE trigger" in str(refused.value)


def test_no_before_row_trigger_takes_a_given_subject() -> None:
    _ctx(False).check_given_subject("public.people", SUBJECT)
    _ctx(True).check_given_subject("public.other", SUBJECT)
