"""libsignal's published known-answer vectors, run through Pigeon's own code
in its classic configuration (libsignal's labels, no header encryption).
The values and their sources are in tests/vectors/libsignal.json.

Every expected value below is one of libsignal's.  Where a test checks a
property instead (how a safety number depends on its inputs), it is a
property of the algorithm, run on libsignal's inputs: no test compares our
output, or the vector file, with itself."""

import json
import os
from pathlib import Path

import pytest

from pigeon.protocol import CLASSIC, RatchetState, safety_number, scannable_fingerprint
from pigeon.protocol.crypto import x25519_public
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


# -- safety numbers ---------------------------------------------------------------------


def fingerprint_inputs() -> dict[str, bytes]:
    """libsignal's fingerprint inputs; the keys keep libsignal's 0x05 type
    byte, which libsignal hashes as part of the key."""
    v = VECTORS["fingerprint_v1"]
    return {
        "alice_key": h(v["alice_identity"]),
        "alice_id": v["alice_stable_id"].encode(),
        "bob_key": h(v["bob_identity"]),
        "bob_id": v["bob_stable_id"].encode(),
    }


def number_as(local: str, inputs: dict[str, bytes]) -> str:
    """The safety number as ``local`` ("alice" or "bob") computes it."""
    remote = "bob" if local == "alice" else "alice"
    return safety_number(
        inputs[f"{local}_key"],
        inputs[f"{local}_id"],
        inputs[f"{remote}_key"],
        inputs[f"{remote}_id"],
        VECTORS["fingerprint_v1"]["iterations"],
    )


def halves(number: str) -> tuple[str, str]:
    assert len(number) == 60 and number.isdigit()
    return number[:30], number[30:]


def test_displayable_fingerprint_v1():
    """libsignal's DISPLAYABLE_FINGERPRINT_V1, computed by each side with itself as local."""
    v, inputs = VECTORS["fingerprint_v1"], fingerprint_inputs()
    assert number_as("alice", inputs) == v["displayable"]
    assert number_as("bob", inputs) == v["displayable"]
    # the default iteration count is libsignal's, so callers that leave it out agree too
    assert v["iterations"] == 5200
    assert (
        safety_number(inputs["alice_key"], inputs["alice_id"], inputs["bob_key"], inputs["bob_id"])
        == v["displayable"]
    )


def test_scannable_fingerprint_v1():
    """libsignal's ALICE_ and BOB_SCANNABLE_FINGERPRINT_V1; each phone accepts the
    other's code, and a code never matches itself (it names the halves the other
    way round)."""
    v, i = VECTORS["fingerprint_v1"], fingerprint_inputs()
    ours = scannable_fingerprint(i["alice_key"], i["alice_id"], i["bob_key"], i["bob_id"])
    theirs = scannable_fingerprint(i["bob_key"], i["bob_id"], i["alice_key"], i["alice_id"])
    assert ours.hex() == v["alice_scannable"]
    assert theirs.hex() == v["bob_scannable"]
    assert compare_scannable(ours, theirs)
    assert compare_scannable(theirs, ours)
    assert not compare_scannable(ours, ours)
    assert not compare_scannable(theirs, theirs)


def flip_bit(value: bytes, index: int) -> bytes:
    changed = bytearray(value)
    changed[index] ^= 1 << (index % 8)
    return bytes(changed)


def changes_of(name: str) -> list[tuple[str, bytes]]:
    """One-bit changes of one libsignal input: for a key, one in every byte (the
    type byte too); for a stable ID, one in its first, a middle and its last byte."""
    value = fingerprint_inputs()[name]
    if name.endswith("_key"):
        indices = range(len(value))
    else:
        indices = range(0, len(value), max(1, (len(value) - 1) // 2))
    return [(f"byte {i}", flip_bit(value, i)) for i in indices]


@pytest.mark.parametrize("party", ["alice", "bob"])
@pytest.mark.parametrize("what", ["key", "id"])
def test_changing_either_key_or_either_stable_id_changes_that_partys_half(party, what):
    """Each person's 30 digits come from their own key and stable ID alone.

    On libsignal's inputs, changing one input of one party must change the
    number, replace that party's half and keep the other party's half, and
    both sides must still compute the same new number.  (That the unchanged
    number is libsignal's is test_displayable_fingerprint_v1's job.)"""
    other = "bob" if party == "alice" else "alice"
    before = number_as(party, fingerprint_inputs())
    both = set(halves(before))
    kept_halves = set()  # the halves of ``before`` that survived: only ``other``'s may
    for where, changed in changes_of(f"{party}_{what}"):
        inputs = {**fingerprint_inputs(), f"{party}_{what}": changed}
        number = number_as(party, inputs)
        assert number != before, f"{party}'s {what}, {where}: number unchanged"
        assert number_as(other, inputs) == number, f"{party}'s {what}, {where}: sides disagree"
        kept = both & set(halves(number))
        assert len(kept) == 1, f"{party}'s {what}, {where}: {len(kept)} halves kept, not 1"
        kept_halves |= kept
    assert len(kept_halves) == 1, f"changes of {party}'s {what} kept different halves"

    # a change of the other party keeps the half that this party's changes replaced
    _, changed_other = changes_of(f"{other}_key")[-1]
    number = number_as(other, {**fingerprint_inputs(), f"{other}_key": changed_other})
    assert both & set(halves(number)) == both - kept_halves, f"{other}'s change kept the wrong half"


def test_swapping_which_side_is_local_gives_the_same_number():
    """Beyond libsignal's one pair: for fresh keys and IDs, the number is the
    same from both sides, its smaller half first, and the two scannable codes
    accept each other."""
    for n in range(4):
        a_key, b_key = b"\x05" + os.urandom(32), b"\x05" + os.urandom(32)
        a_id, b_id = b"+1415555%04d" % n, os.urandom(8).hex().encode()
        number = safety_number(a_key, a_id, b_key, b_id)
        assert safety_number(b_key, b_id, a_key, a_id) == number
        first, second = halves(number)
        assert first <= second
        assert compare_scannable(
            scannable_fingerprint(a_key, a_id, b_key, b_id),
            scannable_fingerprint(b_key, b_id, a_key, a_id),
        )


# -- the Double Ratchet --------------------------------------------------------------------


def test_chain_key_derivation():
    v = VECTORS["chain_key_derivation"]
    seed, next_chain_key = kdf_chain(h(v["seed"]))
    cipher_key, mac_key, iv = message_keys(CLASSIC, seed)
    assert cipher_key.hex() == v["cipher_key"]
    assert mac_key.hex() == v["mac_key"]
    assert next_chain_key.hex() == v["next_chain_key"]
    assert len(iv) == 16


def bob_shared_secret() -> bytes:
    """X3DH as Bob, from the private keys of libsignal's "as Bob" vector."""
    v = VECTORS["ratcheting_session_as_bob"]
    return responder_secret(
        identity_private=h(v["bob_identity_private"]),
        signed_prekey_private=h(v["bob_signed_prekey_private"]),
        one_time_prekey_private=None,
        their_identity=x25519_key(v["alice_identity_public"]),
        their_base_key=x25519_key(v["alice_base_public"]),
        info=CLASSIC.labels.x3dh,
        length=CLASSIC.x3dh_output_size,
    )


def alice_shared_secret() -> bytes:
    """X3DH as Alice, from the private keys of libsignal's "as Alice" vector."""
    v = VECTORS["ratcheting_session_as_alice"]
    return initiator_secret(
        identity_private=h(v["alice_identity_private"]),
        base_private=h(v["alice_base_private"]),
        their_identity=x25519_key(v["bob_identity_public"]),
        their_signed_prekey=x25519_key(v["bob_signed_prekey_public"]),
        their_one_time_prekey=None,
        info=CLASSIC.labels.x3dh,
        length=CLASSIC.x3dh_output_size,
    )


def bob_session() -> RatchetState:
    v = VECTORS["ratcheting_session_as_bob"]
    # libsignal's vector gives Bob a ratchet key pair whose halves do not match;
    # only the private half enters the computation, as in libsignal.
    return RatchetState.responder(
        CLASSIC, bob_shared_secret(), h(v["bob_ephemeral_private"]), os.urandom
    )


def alice_session() -> RatchetState:
    v = VECTORS["ratcheting_session_as_alice"]
    return RatchetState.initiator(
        CLASSIC, alice_shared_secret(), x25519_key(v["bob_ephemeral_public"]), os.urandom
    )


def test_ratcheting_session_as_bob():
    bob = bob_session()
    assert bob.cks is not None
    assert bob.cks.hex() == VECTORS["ratcheting_session_as_bob"]["expected_sender_chain"]


def test_ratcheting_session_as_alice():
    v = VECTORS["ratcheting_session_as_alice"]
    alice = alice_session()
    assert alice.ckr is not None
    assert alice.ckr.hex() == v["expected_receiver_chain"]
    assert alice.dhr == x25519_key(v["bob_ephemeral_public"])


def test_alice_and_bob_vectors_agree_with_each_other():
    """The two vectors describe one session from its two ends: Bob's X3DH from
    his private keys and Alice's from hers must meet, so what Bob sends on is
    what Alice listens on.  Each public key that the other side uses must be
    the public half of a private key in the vectors."""
    a, b = VECTORS["ratcheting_session_as_alice"], VECTORS["ratcheting_session_as_bob"]
    for private, public in (
        (a["alice_identity_private"], b["alice_identity_public"]),
        (a["alice_base_private"], b["alice_base_public"]),
        (b["bob_identity_private"], a["bob_identity_public"]),
        (b["bob_signed_prekey_private"], a["bob_signed_prekey_public"]),
    ):
        assert x25519_public(h(private)) == x25519_key(public)
    assert alice_shared_secret() == bob_shared_secret()
    alice, bob = alice_session(), bob_session()
    assert alice.ckr is not None and alice.ckr == bob.cks


@pytest.mark.parametrize("label", ["x3dh", "root", "message"])
def test_production_labels_differ_from_libsignal(label):
    from pigeon.protocol import PIGEON

    assert getattr(PIGEON.labels, label) != getattr(CLASSIC.labels, label)
