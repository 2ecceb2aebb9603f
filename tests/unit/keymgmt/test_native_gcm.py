"""The accelerator's own AES-256-GCM open (native/pgveil_gcm.c): the GCM specification's AES-256 test
cases, agreement with ``cryptography``'s AESGCM on random inputs of every length class (and on associated
data beyond what the own open takes, which goes to EVP), every single-bit change of an input refused, the
choice of implementation (``PGVEIL_GCM=evp``, an unknown value, a CPU without the instructions) and that
the own open really runs where the CPU has AES-NI and PCLMULQDQ.

The row kernel's property tests (tests/unit/proxy/encrypt) hold the DataRow path, which opens through the
same function, to the Python reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgmt import native

accel = native.accel
pytestmark = pytest.mark.skipif(
    accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)"
)

# The AES-256 test cases 13 to 16 of the GCM specification (McGrew and Viega, "The Galois/Counter Mode of
# Operation", appendix B): key, IV, associated data, plaintext, ciphertext, tag.
FEFF = "feffe9928665731c6d6a8f9467308308" * 2
P64 = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
C64 = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad"
)
KATS = [
    ("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    ("00" * 32, "00" * 12, "", "00" * 16, "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"),
    (FEFF, "cafebabefacedbaddecaf888", "", P64, C64, "b094dac5d93471bdec1a502270e3cc6c"),
    (
        FEFF,
        "cafebabefacedbaddecaf888",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        P64[:120],
        C64[:120],
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
]


def _cpu_has_the_instructions() -> bool:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in ("aes", "pclmulqdq", "ssse3", "sse4_1"))


CPU_FAST = _cpu_has_the_instructions()


@pytest.mark.parametrize(("key", "iv", "aad", "pt", "ct", "tag"), KATS)
def test_the_specifications_test_cases(key: str, iv: str, aad: str, pt: str, ct: str, tag: str) -> None:
    k, n, a = bytes.fromhex(key), bytes.fromhex(iv), bytes.fromhex(aad)
    sealed = bytes.fromhex(ct + tag)
    assert AESGCM(k).encrypt(n, bytes.fromhex(pt), a) == sealed  # the vectors as transcribed
    assert accel.Key(k).decrypt(n, sealed, a) == bytes.fromhex(pt)
    with pytest.raises(accel.InvalidTag):
        accel.Key(k).decrypt(n, sealed[:-1] + bytes([sealed[-1] ^ 1]), a)


@settings(max_examples=400, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    aad=st.binary(max_size=1100),
    plaintext=st.binary(max_size=300),
)
def test_agrees_with_cryptography(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> None:
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    mine = accel.Key(key)
    assert mine.decrypt(nonce, sealed, aad) == plaintext
    assert AESGCM(key).decrypt(nonce, mine.encrypt(nonce, plaintext, aad), aad) == plaintext


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 33, 64, 65])
def test_every_single_bit_change_is_refused(length: int) -> None:
    key, nonce, aad = bytes(range(32)), bytes(range(12)), b"header-and-column"
    k = accel.Key(key)
    sealed = AESGCM(key).encrypt(nonce, bytes(range(length)), aad)
    for part in ("sealed", "aad", "nonce"):
        original = {"sealed": sealed, "aad": aad, "nonce": nonce}[part]
        for bit in range(8 * len(original)):
            changed = bytearray(original)
            changed[bit // 8] ^= 1 << (bit % 8)
            args = {"sealed": sealed, "aad": aad, "nonce": nonce, part: bytes(changed)}
            with pytest.raises(accel.InvalidTag):
                k.decrypt(args["nonce"], args["sealed"], args["aad"])
    with pytest.raises(accel.InvalidTag):  # a tag cut short is not an envelope's either
        k.decrypt(nonce, sealed[:-1], aad)


def _probe(gcm: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGVEIL_GCM", "PGVEIL_IMPL")}
    if gcm is not None:
        env["PGVEIL_GCM"] = gcm
    code = (
        "import pgveil_accel as a;"
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM;"
        "k = bytes(range(32)); s = AESGCM(k).encrypt(b'n' * 12, b'canary-value', b'ad');"
        "print(a.gcm_implementation(), a.Key(k).decrypt(b'n' * 12, s, b'ad') == b'canary-value');"
        "print(a.gcm_fallback_reason())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.splitlines()


def test_evp_is_forced_by_the_environment_and_gives_the_same_results() -> None:
    assert _probe("evp") == ["evp True", "PGVEIL_GCM=evp"]


def test_an_unknown_value_runs_evp_and_says_why() -> None:
    assert _probe("fastest") == ["evp True", "PGVEIL_GCM is neither 'auto' nor 'evp'"]


@pytest.mark.skipif(not CPU_FAST, reason="this CPU lacks AES-NI, PCLMULQDQ, SSSE3 or SSE4.1")
def test_the_own_open_runs_where_the_cpu_can() -> None:
    """Where the instructions exist the fast path must be the one running (so a silent fallback to EVP,
    such as a failing self-test, fails here), and its self-test passes when run again."""
    assert _probe(None) == ["aesni-pclmul True", ""]
    assert _probe("auto") == ["aesni-pclmul True", ""]
    assert accel.gcm_self_test() is True
    assert "AES-GCM open: aesni-pclmul" in native.describe()


@pytest.mark.skipif(CPU_FAST, reason="this CPU has the instructions")
def test_without_the_instructions_evp_runs() -> None:
    assert _probe(None)[0] == "evp True"
    assert accel.gcm_self_test() is None
