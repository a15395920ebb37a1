"""libsignal's published known-answer vectors, run through Pigeon's own code
in its classic configuration (libsignal's labels, no header encryption).
The values and their sources are in tests/vectors/libsignal.json."""

import json
import os
from pathlib import Path

import pytest

from pigeon.protocol import CLASSIC, RatchetState, safety_number, scannable_fingerprint
from pigeon.protocol.fingerprint import compare_scannable
from pigeon.protocol.ratchet import kdf_chain, message_keys
from pigeon.protocol.x3dh import initiator_secret, responder_secret

VECTORS = json.loads((Path(__file__).parent / "vectors" / "libsignal.json").read_text())


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def x25519_key(value: str) -> bytes:
    """libsignal prefixes public keys with the type byte 0x05."""
    raw = h(value)
    assert raw[0] == 0x05 and len(raw) == 33
    return raw[1:]


def test_displayable_fingerprint_v1():
    v = VECTORS["fingerprint_v1"]
    alice, bob = h(v["alice_identity"]), h(v["bob_identity"])
    a_id, b_id = v["alice_stable_id"].encode(), v["bob_stable_id"].encode()
    assert safety_number(alice, a_id, bob, b_id, v["iterations"]) == v["displayable"]
    assert safety_number(bob, b_id, alice, a_id) == v["displayable"]


def test_scannable_fingerprint_v1():
    v = VECTORS["fingerprint_v1"]
    alice, bob = h(v["alice_identity"]), h(v["bob_identity"])
    a_id, b_id = v["alice_stable_id"].encode(), v["bob_stable_id"].encode()
    ours = scannable_fingerprint(alice, a_id, bob, b_id)
    theirs = scannable_fingerprint(bob, b_id, alice, a_id)
    assert ours.hex() == v["alice_scannable"]
    assert theirs.hex() == v["bob_scannable"]
    assert compare_scannable(ours, theirs)
    assert not compare_scannable(ours, ours)


def test_safety_number_changes_with_either_key():
    v = VECTORS["fingerprint_v1"]
    alice, bob = bytearray(h(v["alice_identity"])), h(v["bob_identity"])
    alice[-1] ^= 1
    assert safety_number(bytes(alice), b"a", bob, b"b") != v["displayable"]


def test_chain_key_derivation():
    v = VECTORS["chain_key_derivation"]
    seed, next_chain_key = kdf_chain(h(v["seed"]))
    cipher_key, mac_key, iv = message_keys(CLASSIC, seed)
    assert cipher_key.hex() == v["cipher_key"]
    assert mac_key.hex() == v["mac_key"]
    assert next_chain_key.hex() == v["next_chain_key"]
    assert len(iv) == 16


def test_ratcheting_session_as_bob():
    v = VECTORS["ratcheting_session_as_bob"]
    shared = responder_secret(
        identity_private=h(v["bob_identity_private"]),
        signed_prekey_private=h(v["bob_signed_prekey_private"]),
        one_time_prekey_private=None,
        their_identity=x25519_key(v["alice_identity_public"]),
        their_base_key=x25519_key(v["alice_base_public"]),
        info=CLASSIC.labels.x3dh,
        length=CLASSIC.x3dh_output_size,
    )
    # libsignal's vector gives Bob a ratchet key pair whose halves do not match;
    # only the private half enters the computation, as in libsignal.
    bob = RatchetState.responder(CLASSIC, shared, h(v["bob_ephemeral_private"]), os.urandom)
    assert bob.cks is not None
    assert bob.cks.hex() == v["expected_sender_chain"]


def test_ratcheting_session_as_alice():
    v = VECTORS["ratcheting_session_as_alice"]
    shared = initiator_secret(
        identity_private=h(v["alice_identity_private"]),
        base_private=h(v["alice_base_private"]),
        their_identity=x25519_key(v["bob_identity_public"]),
        their_signed_prekey=x25519_key(v["bob_signed_prekey_public"]),
        their_one_time_prekey=None,
        info=CLASSIC.labels.x3dh,
        length=CLASSIC.x3dh_output_size,
    )
    alice = RatchetState.initiator(
        CLASSIC, shared, x25519_key(v["bob_ephemeral_public"]), os.urandom
    )
    assert alice.ckr is not None
    assert alice.ckr.hex() == v["expected_receiver_chain"]
    assert alice.dhr == x25519_key(v["bob_ephemeral_public"])


def test_alice_and_bob_vectors_agree_with_each_other():
    """The two halves of the vector describe one session: Alice's base key
    public half matches her private half, so both sides must meet."""
    a = VECTORS["ratcheting_session_as_alice"]
    from pigeon.protocol.crypto import x25519_public

    assert x25519_public(h(a["alice_base_private"])) == x25519_key(a["alice_base_public"])


@pytest.mark.parametrize("label", ["x3dh", "root", "message"])
def test_production_labels_differ_from_libsignal(label):
    from pigeon.protocol import PIGEON

    assert getattr(PIGEON.labels, label) != getattr(CLASSIC.labels, label)
