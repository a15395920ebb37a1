"""Pigeon's primitive wrappers against the reference implementations."""

import hashlib
import hmac
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.protocol import DecryptError
from pigeon.protocol.crypto import hkdf, hmac_sha256_pair, x25519, x25519_keypair


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=100), st.binary(max_size=100))
def test_hmac_pair_matches_the_hmac_module(key, first, second):
    assert hmac_sha256_pair(key, first, second) == (
        hmac.new(key, first, hashlib.sha256).digest(),
        hmac.new(key, second, hashlib.sha256).digest(),
    )


def test_hkdf_rfc5869_case_1():
    """RFC 5869, Appendix A.1 (basic test case with SHA-256)."""
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    assert hkdf(ikm, salt, info, 42).hex() == okm


@pytest.mark.parametrize(
    "public",
    [
        bytes(32),  # the identity point: DH output would be all zeros
        bytes([1]) + bytes(31),
        b"\xe0\xebz|;A\xb8\xae\x16V\xe3\xfa\xf1\x9f\xc4j\xda\t\x8d\xeb\x9c2\xb1\xfd\x86b\x05\x16_I\xb8\x00",
        bytes(31),  # wrong length
    ],
)
def test_low_order_or_malformed_public_keys_are_refused(public):
    private, _ = x25519_keypair(os.urandom)
    with pytest.raises(DecryptError):
        x25519(private, public)


def test_x25519_agrees():
    a, a_pub = x25519_keypair(os.urandom)
    b, b_pub = x25519_keypair(os.urandom)
    assert x25519(a, b_pub) == x25519(b, a_pub)
