"""Pigeon's key agreement and ratchet key schedule against code no one here wrote.

- The ``doubleratchet`` package (Syndace's python-doubleratchet 1.3.0),
  configured with the same KDFs (see benchmarks/doubleratchet_peer.py), must
  derive the same root, chain and message keys from the same inputs: KDF_RK on
  its own, one DH ratchet step field by field, and whole conversations message
  by message in both directions.
- The ``x3dh`` package (Syndace's python-x3dh 1.3.0), configured with X25519,
  Ed25519 identity keys, SHA-256 and our info label, must agree with our X3DH
  on both sides, with and without a one-time prekey.

Header encryption (the Double Ratchet spec's section 4) has no independent
implementation that can be configured to our primitives; docs/DECISIONS.md
says what was looked at and what checks it instead."""

import os
from types import SimpleNamespace

import pytest
import x3dh as x3dh_package
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from x3dh import base_state as x3dh_base_state
from x3dh.types import SecretType

from benchmarks.doubleratchet_peer import DHRatchet, make_pair, root_chain_step, run
from pigeon.protocol import CLASSIC, PIGEON, IdentityKeyPair, RatchetConfig, RatchetState, x3dh
from pigeon.protocol.crypto import hmac_sha256_pair, x25519_public
from pigeon.protocol.keys import ed25519_to_x25519_public
from pigeon.protocol.ratchet import kdf_root, message_keys

CONFIGS = pytest.mark.parametrize("config", [PIGEON, CLASSIC], ids=["pigeon", "classic"])

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


@CONFIGS
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


# -- KDF_RK and one DH ratchet step against the doubleratchet package (1.3.0) --


@CONFIGS
def test_kdf_root_matches_the_doubleratchet_package(config: RatchetConfig):
    """KDF_RK: the package's root chain (HKDF-SHA256, salt = root key, input =
    DH output, info = our root label; doubleratchet 1.3.0,
    recommended.kdf_hkdf and kdf_chain.KDFChain.step) gives the same root key
    and chain key as ours."""
    for _ in range(8):
        root_key, dh_out = os.urandom(32), os.urandom(32)
        new_root, chain, next_header_key = kdf_root(config, root_key, dh_out)
        # With header encryption ours asks HKDF for 96 bytes, the last 32 being
        # the next header key; the package asks for 64.  HKDF-Expand's output is
        # T(1) || T(2) || ... whatever the length asked for (RFC 5869 2.3), so
        # the first 64 bytes must be the same either way.
        assert (new_root, chain) == root_chain_step(config.labels.root, root_key, dh_out)
        assert len(next_header_key) == (32 if config.header_encryption else 0)


@CONFIGS
def test_one_dh_ratchet_step_matches_the_doubleratchet_package(config: RatchetConfig):
    """Bob receives a message under Alice's new ratchet key, with messages
    missing in both his old receiving chain and the new one.  The package's
    Diffie-Hellman ratchet (doubleratchet 1.3.0, DiffieHellmanRatchet.
    next_decryption_key), restored from Bob's state just before and given the
    same new private key, must end in the same state: root key, receiving and
    sending chains (key and length), previous chain length, ratchet keys, the
    same message key and the same skipped keys."""
    shared = os.urandom(config.x3dh_output_size)
    bob_ratchet_private = os.urandom(32)
    alice_privates = [os.urandom(32) for _ in range(2)]
    bob_privates = [os.urandom(32) for _ in range(2)]
    alice = RatchetState.initiator(
        config, shared, x25519_public(bob_ratchet_private), Keys(alice_privates)
    )
    bob = RatchetState.responder(config, shared, bob_ratchet_private, Keys(list(bob_privates)))

    # Alice sends a0..a2, Bob reads a0 only (a1, a2 stay missing) and answers
    # with b0, b1; Alice reads b1, which moves her to a new ratchet key, and
    # sends a3, a4 under it.  a4 reaches Bob first.
    to_bob = [alice.encrypt(b"a%d" % i, AD) for i in range(3)]
    assert bob.decrypt(to_bob[0], AD) == b"a0"
    to_alice = [bob.encrypt(b"b%d" % i, AD) for i in range(2)]
    assert alice.decrypt(to_alice[1], AD) == b"b1"
    to_bob += [alice.encrypt(b"a%d" % i, AD) for i in range(3, 5)]

    assert bob.cks is not None and bob.dhr is not None
    theirs = DHRatchet(
        config.labels.root,
        own_private=bob.dhs_private,
        their_public=bob.dhr,
        root_key=bob.rk,
        sending_chain=(bob.cks, bob.ns),
        receiving_chain=(bob.ckr, bob.nr),
        previous_sending_length=bob.pn,
        privates=bob_privates[1:],  # Bob's next ratchet key, as ours will take it
    )
    # The package files skipped keys by ratchet public key; ours does too
    # without header encryption, and with it by header key: the old chain's,
    # and the one the new chain's headers open under.
    he = config.header_encryption
    key_id = {
        bob.dhr: bob.hkr if he else bob.dhr,
        alice.dhs_public: bob.nhkr if he else alice.dhs_public,
    }
    # a4's header, as the script above makes it (not as our Alice wrote it):
    # 3 messages in her previous chain, number 1 in this one.
    message_key, their_skipped = theirs.receive(alice.dhs_public, 3, 1)
    assert bob.decrypt(to_bob[4], AD) == b"a4"

    model = theirs.model
    chains = model.symmetric_key_ratchet
    assert chains.receiving_chain is not None and chains.sending_chain is not None
    assert model.other_ratchet_pub == bob.dhr == alice.dhs_public
    assert model.own_ratchet_priv == bob.dhs_private == bob_privates[1]
    assert model.root_chain.key == bob.rk
    assert (chains.receiving_chain.key, chains.receiving_chain.length) == (bob.ckr, bob.nr)
    assert (chains.sending_chain.key, chains.sending_chain.length) == (bob.cks, bob.ns)
    assert chains.previous_sending_chain_length == bob.pn == 2
    assert {(key_id[pub], n): key for (pub, n), key in their_skipped.items()} == bob.skipped
    assert sorted(n for _, n in bob.skipped) == [0, 1, 2]

    # The package's message key opens our a4 (AES-256-GCM over AD || prefix).
    prefix = 1 + config.header_size
    cipher_key, _, iv = message_keys(config, message_key)
    body, ad = to_bob[4][prefix:], AD + to_bob[4][:prefix]
    assert AESGCM(cipher_key).decrypt(iv[:12], body, ad) == b"a4"


# -- X3DH against the x3dh package (1.3.0) -------------------------------------


class X3DHState(x3dh_package.BaseState):
    """The x3dh package's key agreement (x3dh 1.3.0, BaseState), the lower-level
    class so that every key can be injected.  Public keys are encoded as the raw
    32 bytes: the encoding only feeds the signed prekey's signature and the
    associated data, not the shared secret."""

    @staticmethod
    def _encode_public_key(key_format: x3dh_package.IdentityKeyFormat, pub: bytes) -> bytes:
        return pub


def x3dh_state(
    config: RatchetConfig,
    identity: IdentityKeyPair,
    signed_prekey: bytes,
    one_time_prekeys: list[bytes],
) -> X3DHState:
    """The package's state holding our keys.  Identity keys are Ed25519 seeds
    (IdentityKeyFormat.ED_25519), so the package converts them to X25519 with
    its own code (xeddsa), independently of ours (libsodium); the hash is
    SHA-256 and the HKDF info is our X3DH label.  The DHs, their order, the
    F padding and the KDF are all the package's code."""
    model = x3dh_package.BaseStateModel(
        identity_key=x3dh_package.IdentityKeyPairModel(
            secret=identity.seed, secret_type=SecretType.SEED
        ),
        signed_pre_key=x3dh_package.SignedPreKeyPairModel(
            priv=signed_prekey,
            # Pigeon signs a richer record (protocol/records.py); here the
            # package's own check wants a signature of the encoded key itself.
            sig=identity.sign(x25519_public(signed_prekey)),
            timestamp=0,
        ),
        old_signed_pre_key=None,
        pre_keys=frozenset(one_time_prekeys),
    )
    return X3DHState.from_model(
        model,
        x3dh_package.IdentityKeyFormat.ED_25519,
        x3dh_package.HashFunction.SHA_256,
        config.labels.x3dh,
    )


@CONFIGS
@pytest.mark.parametrize("with_one_time_prekey", [True, False], ids=["four-dh", "three-dh"])
def test_x3dh_matches_the_x3dh_package(
    config: RatchetConfig, with_one_time_prekey: bool, monkeypatch: pytest.MonkeyPatch
):
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    signed_prekey, base = os.urandom(32), os.urandom(32)
    one_time_prekey = os.urandom(32) if with_one_time_prekey else None
    one_time_prekeys = [] if one_time_prekey is None else [one_time_prekey]

    theirs_bob = x3dh_state(config, bob, signed_prekey, one_time_prekeys)
    theirs_alice = x3dh_state(config, alice, os.urandom(32), [])
    bundle = theirs_bob.bundle
    # The package derives the Ed25519 public keys from the seeds by itself.
    assert bundle.identity_key == bob.public_key
    assert theirs_alice.bundle.identity_key == alice.public_key

    # The package draws the ephemeral (base) key with secrets.token_bytes and
    # picks a one-time prekey with secrets.choice: hand it ours instead.
    def choice(keys: list[bytes]) -> bytes:
        assert len(keys) == 1
        return keys[0]

    monkeypatch.setattr(
        x3dh_base_state, "secrets", SimpleNamespace(token_bytes=lambda n: base, choice=choice)
    )
    their_initiator, _, header = run(
        theirs_alice.get_shared_secret_active(bundle, require_pre_key=with_one_time_prekey)
    )
    monkeypatch.undo()
    their_responder, _, _ = run(
        theirs_bob.get_shared_secret_passive(header, require_pre_key=with_one_time_prekey)
    )
    assert header.ephemeral_key == x25519_public(base)
    assert header.pre_key == (None if one_time_prekey is None else x25519_public(one_time_prekey))
    assert their_initiator == their_responder

    ours_initiator = x3dh.initiator_secret(
        identity_private=alice.dh_private,
        base_private=base,
        their_identity=ed25519_to_x25519_public(bob.public_key),
        their_signed_prekey=x25519_public(signed_prekey),
        their_one_time_prekey=None if one_time_prekey is None else x25519_public(one_time_prekey),
        info=config.labels.x3dh,
        length=config.x3dh_output_size,
    )
    ours_responder = x3dh.responder_secret(
        identity_private=bob.dh_private,
        signed_prekey_private=signed_prekey,
        one_time_prekey_private=one_time_prekey,
        their_identity=ed25519_to_x25519_public(alice.public_key),
        their_base_key=x25519_public(base),
        info=config.labels.x3dh,
        length=config.x3dh_output_size,
    )
    assert ours_initiator == ours_responder
    assert len(ours_initiator) == config.x3dh_output_size
    # Both run HKDF-SHA256 over F || DH1 || DH2 || DH3 [|| DH4] with a zero salt
    # (ours: salt None, which HKDF takes as 32 zero bytes; the package: 32 zero
    # bytes).  Ours asks for 64 or 128 bytes (root key, first chain key, header
    # keys), the package for 32; HKDF-Expand's first block T(1) does not depend
    # on the length asked for (RFC 5869 2.3), so the first 32 bytes must match.
    assert ours_initiator[:32] == their_initiator
    assert ours_responder[:32] == their_responder
