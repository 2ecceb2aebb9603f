from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from keymgmt.errors import MasterKeyError, ProviderConfigError
from keymgmt.providers import KeyProvider, LocalKeyProvider, make_provider

DEK = bytes(range(100, 132))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_creates_private_hex_file_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys" / "master.key"
    with caplog.at_level(logging.WARNING, logger="keymgmt.providers"):
        provider = LocalKeyProvider(path)
    assert mode_of(path) == 0o600
    content = path.read_bytes()
    assert len(content) == 65
    assert content.endswith(b"\n")
    assert len(bytes.fromhex(content[:-1].decode())) == 32
    assert any("GENERATED A NEW MASTER KEY" in r.getMessage() for r in caplog.records)
    assert any("development only" in r.getMessage() for r in caplog.records)
    # the key itself is never logged, nor shown by repr
    key_hex = content[:-1].decode()
    assert all(key_hex not in r.getMessage() for r in caplog.records)
    assert key_hex not in repr(provider)
    # no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]


def test_existing_file_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = LocalKeyProvider(path)
    second = LocalKeyProvider(path)
    assert first.kek_id == second.kek_id
    assert first.kek_id.startswith("local-")
    assert second.unwrap(first.wrap(DEK), first.kek_id) == DEK


def test_file_without_trailing_newline_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("ab" * 32)
    path.chmod(0o600)
    provider = LocalKeyProvider(path)
    assert provider.unwrap(provider.wrap(DEK), provider.kek_id) == DEK


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o660])
def test_loose_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    LocalKeyProvider(path)
    path.chmod(mode)
    with pytest.raises(MasterKeyError, match="group or others"):
        LocalKeyProvider(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"ab" * 31 + b"\n", b"ab" * 33 + b"\n", b"zz" * 32 + b"\n", b"ab" * 32 + b"\n\n", bytes(32)],
    ids=["empty", "short", "long", "not-hex", "two-newlines", "raw-bytes"],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(MasterKeyError, match="hex digits") as info:
        LocalKeyProvider(path)
    assert "abab" not in str(info.value)


def test_symlink_is_followed_and_its_target_checked(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    real = LocalKeyProvider(target)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert LocalKeyProvider(link).kek_id == real.kek_id
    target.chmod(0o644)
    with pytest.raises(MasterKeyError, match="group or others"):
        LocalKeyProvider(link)


def test_unreadable_key_file_is_a_master_key_error(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.symlink_to(path)  # a symlink loop: open() fails with ELOOP
    with pytest.raises(MasterKeyError, match="cannot open"):
        LocalKeyProvider(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    with pytest.raises(MasterKeyError):
        LocalKeyProvider(path)


def test_wrap_hides_the_dek_and_is_randomised(tmp_path: Path) -> None:
    provider = LocalKeyProvider(tmp_path / "master.key")
    one, two = provider.wrap(DEK), provider.wrap(DEK)
    assert len(one) == 60
    assert one != two
    assert DEK not in one
    assert provider.unwrap(one, provider.kek_id) == DEK
    assert provider.unwrap(two, provider.kek_id) == DEK
    with pytest.raises(ValueError, match="32 bytes"):
        provider.wrap(DEK[:16])


def test_another_master_key_cannot_unwrap(tmp_path: Path) -> None:
    first = LocalKeyProvider(tmp_path / "a.key")
    second = LocalKeyProvider(tmp_path / "b.key")
    assert first.kek_id != second.kek_id
    wrapped = first.wrap(DEK)
    with pytest.raises(MasterKeyError, match="holds KEK"):
        second.unwrap(wrapped, first.kek_id)


def test_every_byte_flip_of_a_wrapped_dek_fails(tmp_path: Path) -> None:
    provider = LocalKeyProvider(tmp_path / "master.key")
    wrapped = provider.wrap(DEK)
    for position in range(len(wrapped)):
        tampered = bytearray(wrapped)
        tampered[position] ^= 0x01
        with pytest.raises(MasterKeyError, match="does not authenticate"):
            provider.unwrap(bytes(tampered), provider.kek_id)
    with pytest.raises(MasterKeyError, match="wrong length"):
        provider.unwrap(wrapped[:-1], provider.kek_id)


def test_concurrent_first_use_converges_on_one_key(tmp_path: Path) -> None:
    # Several children wait on one pipe, then race to create the same file; link() lets exactly one
    # win and the others must read the winner's key, so all report the same KEK id.
    path = tmp_path / "master.key"
    go_read, go_write = os.pipe()
    children: list[tuple[int, int]] = []
    for _ in range(4):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            os.close(go_write)
            try:
                os.read(go_read, 1)
                os.write(w, LocalKeyProvider(path).kek_id.encode())
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    os.close(go_read)
    os.close(go_write)  # every child's read() returns now
    ids = set()
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            ids.add(f.read())
        os.waitpid(pid, 0)
    assert ids == {LocalKeyProvider(path).kek_id.encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]


def test_make_provider_local_resolves_relative_paths(tmp_path: Path) -> None:
    provider: KeyProvider = make_provider({"type": "local", "path": "secrets/master.key"}, tmp_path)
    assert provider.provider_id == "local"
    assert (tmp_path / "secrets" / "master.key").exists()
    absolute = make_provider({"type": "local", "path": str(tmp_path / "abs.key")}, Path("/nonexistent"))
    assert (tmp_path / "abs.key").exists()
    assert absolute.kek_id != provider.kek_id


def test_make_provider_pkcs11_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError) as info:
        make_provider({"type": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so"}, tmp_path)
    assert info.value.setting == "token_label"
    spec = {"type": "pkcs11", "module": str(tmp_path / "missing.so"), "token_label": "t", "key_label": "k"}
    with pytest.raises(ProviderConfigError) as info:
        make_provider(spec, tmp_path)
    assert info.value.setting == "pin_file"
    with pytest.raises(ProviderConfigError, match="PGVEIL_TEST_UNSET_PIN is not set") as info:
        make_provider({**spec, "pin_env": "PGVEIL_TEST_UNSET_PIN"}, tmp_path)
    (tmp_path / "pin").write_text("secret-pin-1234\n")
    with pytest.raises(MasterKeyError, match="cannot load the PKCS#11 module") as loading:
        make_provider({**spec, "pin_file": "pin"}, tmp_path)
    assert "secret-pin-1234" not in str(loading.value)


@pytest.mark.parametrize(
    ("spec", "setting"),
    [
        ({"type": "vault"}, "type"),
        ({}, "type"),
        ({"type": "local"}, "path"),
        ({"type": "local", "path": ""}, "path"),
        ({"type": "local", "path": "k", "passphrase": "x"}, "passphrase"),
    ],
)
def test_make_provider_names_the_bad_setting(tmp_path: Path, spec: dict[str, object], setting: str) -> None:
    with pytest.raises(ProviderConfigError) as info:
        make_provider(spec, tmp_path)
    assert info.value.setting == setting
    assert info.value.sqlstate == "F0000"


# -- KEK versions (rotation) -------------------------------------------------------------------------


def test_a_new_local_kek_replaces_the_file_and_keeps_the_old_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    provider = LocalKeyProvider(path)
    old_id = provider.kek_id
    under_old = provider.wrap(DEK)
    new_id = provider.create_kek()
    assert new_id != old_id
    assert provider.kek_id == new_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key", f"master.key.{old_id}"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())
    assert provider.unwrap(under_old, old_id) == DEK
    assert provider.unwrap(provider.wrap(DEK), new_id) == DEK
    assert provider.unwrap(provider.wrap(DEK, old_id), old_id) == DEK


def test_a_running_local_provider_finds_versions_made_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    running = LocalKeyProvider(path)
    rotator = LocalKeyProvider(path)
    new_id = rotator.create_kek()
    assert running.holds(new_id)
    assert running.kek_id == new_id  # the file it was configured with now holds the newest version
    assert running.unwrap(rotator.wrap(DEK), new_id) == DEK
    assert LocalKeyProvider(path).holds(new_id)
    assert not running.holds("local-" + "0" * 32)
    assert not running.holds("pkcs11-t/k/v1")


def test_destroying_a_local_kek_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    provider = LocalKeyProvider(path)
    old_id = provider.kek_id
    under_old = provider.wrap(DEK)
    provider.create_kek()
    other = LocalKeyProvider(path)
    assert provider.destroy_kek(old_id) is True
    assert provider.destroy_kek(old_id) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]
    for p in (provider, other):  # `other` had not loaded the old version; nothing can find it now
        with pytest.raises(MasterKeyError):
            p.unwrap(under_old, old_id)


def test_destroying_the_kek_in_the_configured_file_removes_that_file(tmp_path: Path) -> None:
    # After a move to another provider the local one is only in previous_master_keys; its KEK, the one
    # in the configured file, is destroyed there.
    path = tmp_path / "master.key"
    provider = LocalKeyProvider(path)
    kek_id = provider.kek_id
    wrapped = provider.wrap(DEK)
    assert provider.destroy_kek(kek_id) is True
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MasterKeyError):
        provider.unwrap(wrapped, kek_id)


# -- the pkcs11 PIN (read without a token) ---------------------------------------------------------------


def test_the_pkcs11_pin_comes_from_exactly_one_of_a_file_and_the_environment(tmp_path: Path) -> None:
    from keymgmt.pkcs11 import read_pin

    (tmp_path / "pin").write_text("0000-pin\nignored second line\n")
    assert read_pin({"pin_file": "pin"}, tmp_path) == "0000-pin"
    assert read_pin({"pin_env": "HSM_PIN"}, tmp_path, {"HSM_PIN": "from-env"}) == "from-env"
    for spec, setting in [
        ({}, "pin_file"),
        ({"pin_file": "pin", "pin_env": "HSM_PIN"}, "pin_file"),
        ({"pin_env": "HSM_PIN"}, "pin_env"),
        ({"pin_env": ""}, "pin_env"),
        ({"pin_file": "missing"}, "pin_file"),
    ]:
        with pytest.raises(ProviderConfigError) as info:
            read_pin(spec, tmp_path, {})
        assert info.value.setting == setting
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ProviderConfigError, match="is empty"):
        read_pin({"pin_file": "empty"}, tmp_path, {})


def test_a_chain_routes_to_the_member_holding_the_kek_and_flattens_nested_chains(tmp_path: Path) -> None:
    from keymgmt.providers import ProviderChain

    a, b, c = (LocalKeyProvider(tmp_path / name) for name in ("a.key", "b.key", "c.key"))
    chain = ProviderChain(a, ProviderChain(b, c))
    assert chain.providers == (a, b, c)
    assert (chain.provider_id, chain.kek_id) == ("local", a.kek_id)
    assert chain.unwrap(c.wrap(DEK), c.kek_id) == DEK
    assert a.unwrap(chain.wrap(DEK), a.kek_id) == DEK
    assert b.unwrap(chain.wrap(DEK, b.kek_id), b.kek_id) == DEK
    with pytest.raises(MasterKeyError, match="no configured key provider holds"):
        chain.wrap(DEK, "local-" + "f" * 32)
    assert chain.destroy_kek(c.kek_id) is True
    assert not (tmp_path / "c.key").exists()
