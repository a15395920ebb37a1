"""Pigeon's ratchet key schedule against an independent implementation: the
``doubleratchet`` package configured with the same KDFs (see
benchmarks/doubleratchet_peer.py) must derive the same root, chain and message
keys from the same inputs, message by message, in both directions."""

import os

import pytest

from benchmarks.doubleratchet_peer import make_pair
from pigeon.protocol import CLASSIC, PIGEON, RatchetConfig, RatchetState
from pigeon.protocol.crypto import hmac_sha256_pair, x25519_public

AD = b"associated data"


class Keys:
    """Randomness that hands out a fixed list of ratchet private keys."""

    def __init__(self, privates: list[bytes]) -> None:
        self.privates = list(privates)

    def __call__(self, n: int) -> bytes:
        if n == 32:
            return self.privates.pop(0)
        return os.urandom(n)  # header nonces: not part of the key schedule


def seed_of(chain_key: bytes | None) -> bytes:
    assert chain_key is not None
    return hmac_sha256_pair(chain_key, b"\x01", b"\x02")[0]


# A conversation script: (sender, count); receivers read in order unless noted.
SCRIPT = [("alice", 3), ("bob", 2), ("alice", 1), ("bob", 4), ("alice", 2), ("alice", 2)]


@pytest.mark.parametrize("config", [PIGEON, CLASSIC], ids=["pigeon", "classic"])
def test_same_keys_as_the_doubleratchet_package(config: RatchetConfig):
    shared = os.urandom(config.x3dh_output_size)
    bob_ratchet_private = os.urandom(32)
    alice_privates = [os.urandom(32) for _ in range(10)]
    bob_privates = [os.urandom(32) for _ in range(10)]

    ours = {
        "alice": RatchetState.initiator(
            config, shared, x25519_public(bob_ratchet_private), Keys(alice_privates)
        ),
        "bob": RatchetState.responder(config, shared, bob_ratchet_private, Keys(bob_privates)),
    }
    first_seed = seed_of(ours["alice"].cks)
    ours["bob"].decrypt(ours["alice"].encrypt(b"", AD), AD)

    alice, bob = make_pair(
        shared[:32],
        bob_ratchet_private,
        AD,
        alice_privates=alice_privates,
        bob_privates=bob_privates,
        root_info=config.labels.root,
        message_info=config.labels.message,
    )
    theirs = {"alice": alice, "bob": bob}
    assert alice.used_message_keys[0] == first_seed

    def compare() -> None:
        for name in ("alice", "bob"):
            assert ours[name].rk == theirs[name].root_key(), name
            assert ours[name].cks == theirs[name].sending_chain_key(), name
            their_ckr = theirs[name].receiving_chain_key()
            if their_ckr is None:
                # The one documented difference: like libsignal, Alice starts
                # with a receiving chain for Bob's initial (never used) chain.
                assert name == "alice" and ours[name].ckr == shared[32:64]
            else:
                assert ours[name].ckr == their_ckr, name

    compare()
    for sender, count in SCRIPT:
        receiver = "bob" if sender == "alice" else "alice"
        ours_out, theirs_out = [], []
        for i in range(count):
            expected_seed = seed_of(ours[sender].cks)
            ours_out.append(ours[sender].encrypt(b"m%d" % i, AD))
            theirs_out.append(theirs[sender].encrypt(b"m%d" % i))
            assert theirs[sender].used_message_keys[-1] == expected_seed
        # deliver the last one first, so both sides must store skipped keys
        order = [count - 1, *range(count - 1)]
        for i in order:
            assert ours[receiver].decrypt(ours_out[i], AD) == b"m%d" % i
            assert theirs[receiver].decrypt(theirs_out[i]) == b"m%d" % i
        compare()
    total = 1 + sum(count for _, count in SCRIPT)
    sent = alice.used_message_keys + bob.used_message_keys
    assert len(sent) == 2 * total  # every key used once to seal and once to open
    assert len(set(sent)) == total


def test_the_cross_check_detects_a_different_label():
    """Sanity: with another root label the two implementations disagree."""
    config = PIGEON
    shared = os.urandom(config.x3dh_output_size)
    bob_ratchet_private = os.urandom(32)
    privates = [os.urandom(32)]
    ours = RatchetState.initiator(
        config, shared, x25519_public(bob_ratchet_private), Keys(privates)
    )
    alice, _ = make_pair(
        shared[:32],
        bob_ratchet_private,
        AD,
        alice_privates=list(privates),
        root_info=b"some other label",
        message_info=config.labels.message,
    )
    assert ours.rk != alice.root_key()
