"""The pkcs11 key provider against SoftHSM2, end to end: pgveil with its KEK on a token, the migration
from the local provider to the token, rotation and destruction on the token, and a token that goes away.

The tests initialise their own tokens (``softhsm2-util --init-token``) in a token directory of their own
(``SOFTHSM2_CONF`` points at a temporary configuration), never the machine's. SoftHSM2 comes from
Debian's ``softhsm2`` package, which ``scripts/bootstrap`` installs when run as root; without it these
tests are skipped only when not running as root (as root, a missing SoftHSM2 is a failure).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pkcs11
import psycopg
import pytest
from pkcs11 import Attribute, ObjectClass
from test_keystore_kek_rotation import (
    TABLE,
    KekEnv,
    Workload,
    app_dsn,
    assert_rows,
    kek_env,
    kek_ids_in_use,
    list_keks_json,
    pgveil,
    seed_deks,
    unwrapped_materials,
)

from keymgmt.errors import MasterKeyError, ProviderConfigError
from keymgmt.providers import LocalKeyProvider, ProviderChain, make_provider

pytestmark = pytest.mark.integration
__all__ = ["kek_env"]  # the fixture, shared with test_keystore_kek_rotation

MODULES = [Path("/usr/lib/softhsm/libsofthsm2.so"), Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")]
KEY_LABEL = "pgveil-kek"
INIT_TOKEN = ["softhsm2-util", "--init-token", "--free"]
TOKENS = 6  # one per test that needs a token, at most


@dataclass
class SoftHsm:
    root: Path
    module: Path
    free: list[tuple[str, str, Path]] = field(default_factory=list)

    def init_token(self, label: str) -> tuple[str, str, Path]:
        pin = secrets.token_hex(8)
        run = subprocess.run(
            [*INIT_TOKEN, "--label", label, "--pin", pin, "--so-pin", secrets.token_hex(8)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        pin_file = self.root / f"{label}.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        return label, pin, pin_file

    def token(self) -> tuple[str, str, Path]:
        """A fresh token: its label, user PIN and a file holding the PIN. Made up front, because a
        process that has loaded SoftHSM2 does not see tokens initialised after that."""
        return self.free.pop()

    def master_key(self, label: str, pin_file: Path) -> dict[str, Any]:
        return {
            "provider": "pkcs11",
            "module": str(self.module),
            "token_label": label,
            "key_label": KEY_LABEL,
            "pin_file": str(pin_file),
        }

    def token_keys(self, label: str, pin: str) -> list[dict[str, Any]]:
        """The secret keys on a token, as PKCS#11 reports them (never their values: they are sensitive)."""
        token = pkcs11.lib(str(self.module)).get_token(token_label=label)
        try:
            session = token.open(user_pin=pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            session = token.open()
        keys = []
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            keys.append(
                {
                    "label": obj[Attribute.LABEL],
                    "id": bytes(obj[Attribute.ID]),
                    "sensitive": obj[Attribute.SENSITIVE],
                    "extractable": obj[Attribute.EXTRACTABLE],
                    "token": obj[Attribute.TOKEN],
                    "value_readable": _readable(obj),
                }
            )
        return sorted(keys, key=lambda k: k["id"])


def _readable(obj: Any) -> bool:
    try:
        obj[Attribute.VALUE]
    except pkcs11.exceptions.PKCS11Error:
        return False
    return True


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    module = next((m for m in MODULES if m.exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        if os.geteuid() != 0:
            pytest.skip("SoftHSM2 is not installed and this run is not root (scripts/bootstrap installs it as root)")
        pytest.fail("SoftHSM2 is not installed although this run is root: run scripts/bootstrap")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    # Read once per process, when the module is first loaded; pgveil subprocesses inherit it.
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    hsm = SoftHsm(root, module)
    hsm.free = [hsm.init_token("t" + secrets.token_hex(5)) for _ in range(TOKENS)]
    yield hsm
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved


# -- end to end ----------------------------------------------------------------------------------------


def test_pgveil_round_trips_through_a_kek_on_the_token(kek_env: KekEnv, softhsm: SoftHsm) -> None:
    label, pin, pin_file = softhsm.token()
    proxy = kek_env.start_proxy(kek_env.config(softhsm.master_key(label, pin_file)))
    canary = "hsm-canary-" + secrets.token_hex(6)
    with psycopg.connect(app_dsn(proxy), autocommit=True) as c:
        c.execute(f"INSERT INTO {TABLE} (id, secret) VALUES (1, %s), (2, %s)", (canary, "second"))
        assert c.execute(f"SELECT id, secret FROM {TABLE} ORDER BY id").fetchall() == [(1, canary), (2, "second")]

    async def through_asyncpg() -> list[Any]:
        conn = await asyncpg.connect(app_dsn(proxy))
        try:
            await conn.execute(f"INSERT INTO {TABLE} (id, secret) VALUES ($1, $2)", 3, "via asyncpg")
            return [tuple(r) for r in await conn.fetch(f"SELECT id, secret FROM {TABLE} WHERE id = $1", 3)]
        finally:
            await conn.close()

    assert asyncio.run(through_asyncpg()) == [(3, "via asyncpg")]

    async def stored() -> tuple[list[Any], list[Any]]:
        conn = await asyncpg.connect(kek_env.direct_dsn)
        try:
            values = await conn.fetch(f"SELECT secret FROM {TABLE}")
            keks = await conn.fetch("SELECT kek_id, provider_id, version, is_primary FROM pgveil.keks")
            return [bytes(r["secret"]) for r in values], [tuple(r) for r in keks]
        finally:
            await conn.close()

    values, keks = asyncio.run(stored())
    assert all(canary.encode() not in v for v in values)
    assert keks == [(f"pkcs11-{label}/{KEY_LABEL}/v1", "pkcs11", 1, True)]
    [wrapped_len] = {len(r) for r in asyncio.run(_wrapped(kek_env.direct_dsn))}
    assert wrapped_len == 41  # mechanism byte + RFC 3394 key wrap of 32 bytes: wrapped on the token
    # The KEK was created on the token by pgveil: a token object, sensitive, never extractable.
    assert softhsm.token_keys(label, pin) == [
        {
            "label": KEY_LABEL,
            "id": b"v1",
            "sensitive": True,
            "extractable": False,
            "token": True,
            "value_readable": False,
        }
    ]
    assert pin not in proxy.logs()
    # A restarted pgveil finds the key on the token (it does not make another) and reads everything.
    fresh = kek_env.start_proxy(kek_env.config(softhsm.master_key(label, pin_file)))
    with psycopg.connect(app_dsn(fresh), autocommit=True) as c:
        assert c.execute(f"SELECT secret FROM {TABLE} ORDER BY id").fetchall() == [
            (canary,),
            ("second",),
            ("via asyncpg",),
        ]
    assert len(softhsm.token_keys(label, pin)) == 1


async def _wrapped(dsn: str) -> list[bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        return [bytes(r["wrapped"]) for r in await conn.fetch("SELECT wrapped FROM pgveil.deks")]
    finally:
        await conn.close()


def test_a_token_module_or_pin_problem_is_one_clear_message_without_the_pin(
    kek_env: KekEnv, softhsm: SoftHsm, tmp_path: Path
) -> None:
    label, pin, pin_file = softhsm.token()
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("not-the-pin-" + secrets.token_hex(4) + "\n")
    spec = {"type": "pkcs11", "module": str(softhsm.module), "token_label": label, "key_label": KEY_LABEL}
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        (
            {**spec, "pin_file": str(wrong)},
            MasterKeyError,
            f"the PKCS#11 token '{label}' refused the PIN (PinIncorrect)",
        ),
        ({**spec, "token_label": "no-such-token", "pin_file": str(pin_file)}, MasterKeyError, "no single token"),
        ({**spec, "module": str(tmp_path / "nope.so"), "pin_file": str(pin_file)}, MasterKeyError, "cannot load"),
        ({**spec, "pin_env": "PGVEIL_TEST_NO_SUCH_PIN"}, ProviderConfigError, "PGVEIL_TEST_NO_SUCH_PIN is not set"),
    ]
    for case, error, message in cases:
        with pytest.raises(error) as info:
            make_provider(case, tmp_path)
        assert message in str(info.value)
        assert pin not in str(info.value)
        assert wrong.read_text().strip() not in str(info.value)
    # The same wrong PIN is not presented to the token again (it may lock the PIN after a few tries).
    with pytest.raises(MasterKeyError, match="not tried again until the PIN changes"):
        make_provider(cases[0][0], tmp_path)
    assert make_provider({**spec, "pin_file": str(pin_file)}, tmp_path).kek_id.startswith(f"pkcs11-{label}/")

    # pgveil with the wrong PIN: up, not ready, protected statements refused (55000), one line in its log.
    proxy = kek_env.start_proxy_unready(kek_env.config(softhsm.master_key(label, wrong)))
    with psycopg.connect(app_dsn(proxy), autocommit=True) as c:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="cannot load keys"):
            c.execute(f"SELECT secret FROM {TABLE}")
        assert c.execute("SELECT 1").fetchone() == (1,)  # the session stays usable
    logs = proxy.logs()
    assert "cannot load keys from the keystore (MasterKeyError)" in logs
    assert wrong.read_text().strip() not in logs
    assert pin not in logs


def test_rotate_kek_from_the_local_provider_to_the_token(kek_env: KekEnv, softhsm: SoftHsm) -> None:
    """The migration path to an HSM: local -> pkcs11 while pgveil serves, then the local KEK destroyed."""
    label, pin, pin_file = softhsm.token()
    local = kek_env.local_key()
    hsm = softhsm.master_key(label, pin_file)
    local_config = kek_env.write_config("local", kek_env.config(local))
    hsm_config = kek_env.write_config("hsm", kek_env.config(hsm))
    # 1. Today: the local provider.
    first = kek_env.start_proxy(kek_env.config(local))
    with Workload(app_dsn(first)) as app:
        app.wait_for(30)
    key_file = kek_env.workdir / "master.key"
    asyncio.run(seed_deks(kek_env.direct_dsn, LocalKeyProvider(key_file), 500))
    before = asyncio.run(unwrapped_materials(kek_env.direct_dsn, LocalKeyProvider(key_file)))
    # 2. Every proxy gets the token as master_key and the local key as a previous one (rolling restart).
    both = kek_env.config(hsm, previous=[local])
    transitional = kek_env.start_proxy(both)
    first.stop()
    # 3. Re-wrap everything under the token's KEK while the application goes on.
    with Workload(app_dsn(transitional), start_id=10_000) as more:
        more.expected = dict(app.expected)
        more.wait_for(30)
        run = pgveil("keys", "rotate-kek", "--config", str(local_config), "--to-config", str(hsm_config))
        assert run.returncode == 0, run.stderr
        more.wait_for(more.statements + 30)
    assert not more.errors, more.errors
    keks = list_keks_json(local_config)
    assert [(k["version"], k["provider"], k["primary"], k["wrapped_keys"]) for k in keks] == [
        (1, "local", False, 0),
        (2, "pkcs11", True, 501),
    ]
    assert asyncio.run(kek_ids_in_use(kek_env.direct_dsn)) == {f"pkcs11-{label}/{KEY_LABEL}/v1": 501}
    token_provider = make_provider({"type": "pkcs11", **{k: v for k, v in hsm.items() if k != "provider"}}, Path())
    assert asyncio.run(unwrapped_materials(kek_env.direct_dsn, token_provider)) == before
    # 4. The local KEK is destroyed (its key file removed) with the transitional configuration.
    both_config = kek_env.write_config("both", both)
    destroyed = pgveil("keys", "destroy-kek", "1", "--config", str(both_config))
    assert destroyed.returncode == 0, destroyed.stderr
    assert not key_file.exists()
    # 5. The token alone is enough now.
    final = kek_env.start_proxy(kek_env.config(hsm))
    assert_rows(app_dsn(final), more.expected)
    assert [k["id"] for k in softhsm.token_keys(label, pin)] == [b"v1"]


def test_rotation_on_the_token_makes_a_new_key_there_and_destroy_removes_the_old(
    kek_env: KekEnv, softhsm: SoftHsm
) -> None:
    label, pin, pin_file = softhsm.token()
    config = kek_env.config(softhsm.master_key(label, pin_file))
    config_path = kek_env.write_config("hsm", config)
    proxy = kek_env.start_proxy(config)
    hsm_provider = make_provider(
        {"type": "pkcs11", "module": str(softhsm.module), "token_label": label, "key_label": KEY_LABEL}
        | {"pin_file": str(pin_file)},
        Path(),
    )
    asyncio.run(seed_deks(kek_env.direct_dsn, hsm_provider, 300))
    with Workload(app_dsn(proxy)) as app:
        app.wait_for(30)
        run = pgveil("keys", "rotate-kek", "--config", str(config_path), "--batch-size", "50")
        assert run.returncode == 0, run.stderr
        app.wait_for(app.statements + 30)
    assert not app.errors, app.errors
    assert [k["id"] for k in softhsm.token_keys(label, pin)] == [b"v1", b"v2"]
    assert all(not k["extractable"] and k["sensitive"] for k in softhsm.token_keys(label, pin))
    keks = list_keks_json(config_path)
    assert [(k["kek_id"], k["primary"], k["wrapped_keys"]) for k in keks] == [
        (f"pkcs11-{label}/{KEY_LABEL}/v1", False, 0),
        (f"pkcs11-{label}/{KEY_LABEL}/v2", True, 301),
    ]
    destroyed = pgveil("keys", "destroy-kek", "1", "--config", str(config_path))
    assert destroyed.returncode == 0, destroyed.stderr
    assert [k["id"] for k in softhsm.token_keys(label, pin)] == [b"v2"]
    # The running proxy (which found v2 on the token after the rotation) and a new one both read all.
    assert_rows(app_dsn(proxy), app.expected)
    assert_rows(app_dsn(kek_env.start_proxy(config)), app.expected)


# -- a token that goes away ----------------------------------------------------------------------------

_OUTAGE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from keymgmt.keystore import Keystore
    from keymgmt.pkcs11 import Pkcs11KeyProvider
    from proxy.encrypt.keyring import KeyRing, KeyUnavailable

    dsn, module, label, pin, tokens = sys.argv[1:6]

    async def main():
        out = {}
        provider = Pkcs11KeyProvider(Path(module), label, "pgveil-kek", pin)
        async with Keystore(dsn, provider) as keystore:
            cached = await keystore.active_key("public.outage.cached")
            other = await keystore.active_key("public.outage.evicted")
            keystore.cache.clear()
            cached = await keystore.active_key("public.outage.cached")
            os.rename(tokens, tokens + ".away")  # the token is gone
            try:
                out["cached_still_works"] = (await keystore.active_key("public.outage.cached")).key_id == cached.key_id
                for name, load in [
                    ("new_key", lambda: keystore.active_key("public.outage.new")),
                    ("uncached_key", lambda: keystore.key_by_id(other.key_id)),
                ]:
                    try:
                        await load()
                        out[name] = "loaded"
                    except Exception as e:
                        out[name] = [type(e).__name__, getattr(e, "sqlstate", None), str(e)]
                ring = KeyRing(keystore)
                fetched = await ring.fetch(column_id="public.outage.new")
                try:
                    ring.active("public.outage.new")
                except KeyUnavailable as e:
                    out["statement"] = [fetched, e.sqlstate, e.message]
            finally:
                os.rename(tokens + ".away", tokens)
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_a_token_that_goes_away_fails_new_keys_with_58000_while_cached_keys_work(
    kek_env: KekEnv, softhsm: SoftHsm, tmp_path: Path
) -> None:
    # A token directory of its own, in a process of its own: SoftHSM2 does not recover in-process from
    # its token directory vanishing, so this must not share the other tests' module instance.
    tokens = tmp_path / "outage-tokens"
    tokens.mkdir()
    conf = tmp_path / "outage.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    pin = secrets.token_hex(8)
    init = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "outage", "--pin", pin, "--so-pin", pin],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    run = subprocess.run(
        [sys.executable, "-c", _OUTAGE_SCRIPT, kek_env.direct_dsn, str(softhsm.module), "outage", pin, str(tokens)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["cached_still_works"] is True
    for name in ("new_key", "uncached_key"):
        kind, sqlstate, message = out[name]
        assert (kind, sqlstate) == ("KeyProviderUnavailable", "58000"), out[name]
        assert "the PKCS#11 token 'outage' cannot be reached" in message
        assert pin not in message
    fetched, sqlstate, message = out["statement"]
    assert (fetched, sqlstate) == (False, "58000")
    assert "public.outage.new is unavailable" in message
    assert pin not in run.stderr


def test_a_chain_routes_each_kek_to_the_provider_that_holds_it(softhsm: SoftHsm, tmp_path: Path) -> None:
    label, _pin, pin_file = softhsm.token()
    hsm = make_provider(
        {"type": "pkcs11", "module": str(softhsm.module), "token_label": label, "key_label": KEY_LABEL}
        | {"pin_file": str(pin_file)},
        tmp_path,
    )
    local = LocalKeyProvider(tmp_path / "local.key")
    chain = ProviderChain(hsm, local)
    dek = os.urandom(32)
    assert chain.kek_id == hsm.kek_id
    assert chain.unwrap(local.wrap(dek), local.kek_id) == dek
    assert chain.unwrap(chain.wrap(dek), hsm.kek_id) == dek
    assert local.unwrap(chain.wrap(dek, local.kek_id), local.kek_id) == dek
    tampered = bytearray(chain.wrap(dek))
    tampered[7] ^= 1
    with pytest.raises(MasterKeyError, match="does not authenticate"):
        chain.unwrap(bytes(tampered), hsm.kek_id)
    with pytest.raises(MasterKeyError, match="no configured key provider holds"):
        chain.unwrap(local.wrap(dek), "local-" + "0" * 32)
