"""Property tests of pairwise sessions (X3DH + Double Ratchet).

* A stateful model (``Conversation``) drives two parties through random
  interleavings of sends in both directions, delivery of any in-flight message
  (so reordering), drops, duplicate deliveries and save/restore of either party
  (whole session or ratchet only).  The model mirrors the receiving half of the
  ratchet (chains, message numbers, the skipped-key store with its per-chain
  limit and its oldest-first eviction), so it predicts the outcome of every
  delivery and the exact shape of the skipped-key store.  Every party runs
  alongside a never-restored twin fed the same deterministic randomness: after
  a restore the two must stay byte-for-byte identical.  Thieves who stole a
  party's state at a random moment follow every message to it on the wire; they
  must read exactly the messages the model says they can (post-compromise
  security) and never a message whose key was already used (forward secrecy).
  It runs with production limits (where every fresh delivery must succeed) and
  with tiny limits (where the model alone decides), each with and without
  header encryption.
* Deterministic tests: forward secrecy of a snapshot, post-compromise security
  after the healing round trip, the skip limits at their boundaries and the
  eviction order, and a few edge cases.
"""

from __future__ import annotations

import copy
import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pigeon.protocol import (
    CLASSIC,
    PIGEON,
    DecryptError,
    IdentityKeyPair,
    IncomingMessage,
    LocalProtocolError,
    OneTimePrekey,
    PrekeyBundle,
    Random,
    RatchetConfig,
    RatchetState,
    Session,
    SignedPrekey,
    x3dh,
)
from pigeon.protocol.crypto import x25519_keypair
from pigeon.protocol.session import KIND_PREKEY, KIND_RATCHET

# -- fixtures -----------------------------------------------------------------

CONFIGS = [pytest.param(PIGEON, id="pigeon"), pytest.param(CLASSIC, id="classic")]


def tight(config: RatchetConfig, per_chain: int, total: int) -> RatchetConfig:
    """``config`` with small skipped-key limits, so tests can reach them cheaply."""
    return RatchetConfig(config.labels, config.header_encryption, per_chain, total)


class SeededRandom:
    """A deterministic stand-in for ``os.urandom``: SHA-256 in counter mode.

    Copies (``copy.deepcopy``) continue the same stream independently, which
    lets a twin of a session draw exactly the keys the session draws.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._buffer += block
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


def start(
    config: RatchetConfig,
    alice_random: Random = os.urandom,
    bob_random: Random = os.urandom,
    *,
    one_time_prekey: bool = True,
) -> tuple[Session, Session, bytes]:
    """Alice initiates from Bob's bundle and Bob answers her first message.

    Returns both sessions and that first message.  Alice has not heard back
    yet: she still wraps her messages in prekey data.
    """
    alice = IdentityKeyPair.generate(alice_random)
    bob = IdentityKeyPair.generate(bob_random)
    spk_private, spk_public = x25519_keypair(bob_random)
    otk, otk_private = OneTimePrekey.create(bob, 7, bob_random) if one_time_prekey else (None, None)
    bundle = PrekeyBundle(bob.public_key, SignedPrekey(1, spk_public, 1000), otk)
    a = Session.initiate(alice, bundle, alice_random, config)
    message = a.encrypt(b"first")
    b, first = Session.respond(
        bob,
        IncomingMessage.decode(message),
        lambda i: spk_private if i == 1 else None,
        lambda i: otk_private if i == 7 else None,
        bob_random,
        config,
    )
    assert first == b"first"
    return a, b, message


def established(config: RatchetConfig = PIGEON) -> tuple[Session, Session]:
    """A pair where Alice has heard back (her next message opens a new DH step)."""
    a, b, _ = start(config)
    assert deliver(a, b.encrypt(b"hello")) == b"hello"
    return a, b


def deliver(receiver: Session, message: bytes) -> bytes:
    return receiver.decrypt(IncomingMessage.decode(message))


def restore(session: Session, config: RatchetConfig, random: Random = os.urandom) -> Session:
    data = session.serialize()
    restored = Session.deserialize(data, random, config)
    assert restored.serialize() == data
    return restored


def refused(receiver: Session, message: bytes) -> None:
    """Delivering ``message`` raises DecryptError and leaves ``receiver`` as it was."""
    before = receiver.serialize()
    with pytest.raises(DecryptError):
        deliver(receiver, message)
    assert receiver.serialize() == before


def ratchet_pair(config: RatchetConfig) -> tuple[RatchetState, RatchetState, bytes]:
    """Bare ratchets from a real X3DH (no one-time prekey) and the session's AD."""
    alice = IdentityKeyPair.generate(os.urandom)
    bob = IdentityKeyPair.generate(os.urandom)
    spk_private, spk_public = x25519_keypair(os.urandom)
    base_private, base_public = x25519_keypair(os.urandom)
    size, info = config.x3dh_output_size, config.labels.x3dh
    shared_a = x3dh.initiator_secret(
        identity_private=alice.dh_private,
        base_private=base_private,
        their_identity=bob.dh_public,
        their_signed_prekey=spk_public,
        their_one_time_prekey=None,
        info=info,
        length=size,
    )
    shared_b = x3dh.responder_secret(
        identity_private=bob.dh_private,
        signed_prekey_private=spk_private,
        one_time_prekey_private=None,
        their_identity=alice.dh_public,
        their_base_key=base_public,
        info=info,
        length=size,
    )
    assert shared_a == shared_b
    return (
        RatchetState.initiator(config, shared_a, spk_public, os.urandom),
        RatchetState.responder(config, shared_b, spk_private, os.urandom),
        alice.public_key + bob.public_key,
    )


def shape(slots: Iterable[tuple[object, int]]) -> list[tuple[int, int]]:
    """Skipped-key slots with chain ids renamed by first appearance, order kept."""
    names: dict[object, int] = {}
    return [(names.setdefault(chain, len(names)), n) for chain, n in slots]


# -- the model ----------------------------------------------------------------

PARTIES = ("alice", "bob")


def other(party: str) -> str:
    return "bob" if party == "alice" else "alice"


@dataclass(eq=False)
class Wire:
    """A message as sent: who to, its place in the sender's ratchet, its bytes."""

    number: int
    receiver: str
    epoch: int  # the sender's DH ratchet step
    pn: int
    n: int
    plaintext: bytes
    data: bytes = field(repr=False)


@dataclass
class PartyModel:
    """What the ratchet of one party should look like, in model terms.

    Epochs number each party's sending DH keys; a party's ``recv_epoch`` is
    the peer epoch of its current receiving chain.
    """

    send_epoch: int
    ns: int
    recv_epoch: int
    nr: int
    pn: int = 0
    heard_back: bool = True
    skipped: dict[tuple[int, int], None] = field(default_factory=dict)  # in age order

    def send(self) -> tuple[int, int, int]:
        header = (self.send_epoch, self.pn, self.ns)
        self.ns += 1
        return header

    def receive(self, wire: Wire, config: RatchetConfig) -> bool:
        """Apply a delivery; False (and no change) when the ratchet must refuse it."""
        limit = config.max_skip_per_chain
        if (wire.epoch, wire.n) in self.skipped:
            del self.skipped[wire.epoch, wire.n]
            return True
        assert wire.epoch <= self.recv_epoch + 1, "model: a peer cannot be two steps ahead"
        if wire.epoch == self.recv_epoch:
            if wire.n < self.nr or wire.n - self.nr > limit:
                return False
            new = [(wire.epoch, i) for i in range(self.nr, wire.n)]
        elif wire.epoch == self.recv_epoch + 1:
            if wire.pn - self.nr > limit or wire.n > limit:
                return False
            new = [(self.recv_epoch, i) for i in range(self.nr, wire.pn)]
            new += [(wire.epoch, i) for i in range(wire.n)]
            self.recv_epoch = wire.epoch
            self.pn, self.ns, self.send_epoch = self.ns, 0, self.send_epoch + 1
        else:
            return False  # an older chain, and this key is gone
        self.nr = wire.n + 1
        self.skipped.update(dict.fromkeys(new))
        while len(self.skipped) > config.max_skipped_total:
            oldest = next(iter(self.skipped))
            del self.skipped[oldest]
            event("evicted: " + ("older chain" if oldest[0] < self.recv_epoch else "this chain"))
        return True


@dataclass(eq=False)
class Thief:
    """A copy of a party's state stolen at some moment, fed every message to it."""

    victim: str
    session: Session
    recv_epoch: int  # the victim's at the theft
    consumed: set[int]  # numbers of the messages the victim had already read

    def can_read(self, wire: Wire) -> bool:
        # Keys the victim used are gone (forward secrecy); the next peer chain is
        # derived from the victim's current DH key, which was stolen; the one
        # after needs a key the victim made after the theft (post-compromise).
        return wire.number not in self.consumed and wire.epoch <= self.recv_epoch + 1

    def follow(self, wire: Wire) -> None:
        if self.can_read(wire):
            assert deliver(self.session, wire.data) == wire.plaintext
            event("thief reads a message")
        else:
            refused(self.session, wire.data)
            event("thief is refused: " + ("key used" if wire.number in self.consumed else "healed"))


class Conversation(RuleBasedStateMachine):
    """Alice and Bob over a lossy, reordering, replaying wire, checked against the model."""

    config: RatchetConfig = PIGEON
    within_limits = True  # production limits: every fresh delivery must succeed
    max_in_flight = 30
    max_thieves = 2

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, Session] = {}
        self.twins: dict[str, Session] = {}
        self.randoms: dict[str, SeededRandom] = {}
        self.models: dict[str, PartyModel] = {}
        self.dh_keys: dict[tuple[str, int], bytes] = {}  # (sender, epoch) -> its DH key
        self.sent: list[Wire] = []
        self.in_flight: list[Wire] = []
        self.delivered: list[Wire] = []
        self.thieves: list[Thief] = []
        self.seed = b""

    @initialize(seed=st.binary(min_size=8, max_size=8), one_time_prekey=st.booleans())
    def establish(self, seed: bytes, one_time_prekey: bool) -> None:
        self.seed = seed
        self.randoms = {who: SeededRandom(who.encode() + seed) for who in PARTIES}
        a, b, first = start(
            self.config, self.randoms["alice"], self.randoms["bob"], one_time_prekey=one_time_prekey
        )
        self.sessions = {"alice": a, "bob": b}
        self.sent = [Wire(0, "bob", 0, 0, 0, b"first", first)]
        self.delivered = list(self.sent)
        # The twins are never saved or restored; they get copies of the same
        # random streams, so they must stay identical to the parties.
        self.twins = copy.deepcopy(self.sessions)
        assert self.twins["alice"].ratchet._random is not self.randoms["alice"]
        # Alice sent message 0 of her epoch 0; Bob read it and made his epoch 1.
        self.models = {
            "alice": PartyModel(send_epoch=0, ns=1, recv_epoch=0, nr=0, heard_back=False),
            "bob": PartyModel(send_epoch=1, ns=0, recv_epoch=0, nr=1),
        }

    # -- the one rule --
    # One rule drawing a weighted action, rather than a rule per action, so
    # that no run goes without deliveries (Hypothesis disables random subsets
    # of rules per run, which wastes most runs of a machine this small).

    ACTIONS = (
        *("send",) * 3,
        *("deliver",) * 3,
        *("deliver_newest", "drop", "duplicate", "tamper", "restore", "steal"),
    )

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        action = data.draw(st.sampled_from(self.ACTIONS), label="action")
        getattr(self, action)(data)

    def send(self, data: st.DataObject) -> None:
        """A party sends a burst of messages (one or more)."""
        sender = data.draw(st.sampled_from(PARTIES), label="sender")
        bodies = data.draw(st.lists(st.binary(max_size=40), min_size=1, max_size=5), label="bodies")
        for body in bodies[: self.max_in_flight - len(self.in_flight)]:
            self.send_one(sender, b"%d:" % len(self.sent) + body)  # unique plaintexts

    def send_one(self, sender: str, plaintext: bytes) -> None:
        data = self.sessions[sender].encrypt(plaintext)
        assert self.twins[sender].encrypt(plaintext) == data
        model = self.models[sender]
        prekey = not model.heard_back
        assert data[0] == (KIND_PREKEY if prekey else KIND_RATCHET)
        epoch, pn, n = model.send()
        self.check_header(sender, epoch, pn, n, IncomingMessage.decode(data).ratchet_message)
        wire = Wire(len(self.sent), other(sender), epoch, pn, n, plaintext, data)
        self.sent.append(wire)
        self.in_flight.append(wire)
        for thief in self.thieves:
            if thief.victim == wire.receiver:
                thief.follow(wire)

    def deliver(self, data: st.DataObject, wire: Wire | None = None) -> None:
        """Any message in flight reaches its receiver (so messages overtake others)."""
        if not self.in_flight:
            return
        if wire is None:
            wire = data.draw(st.sampled_from(self.in_flight), label="delivered")
        receiver, twin = self.sessions[wire.receiver], self.twins[wire.receiver]
        model = self.models[wire.receiver]
        kind = self.delivery_kind(wire)
        if model.receive(wire, self.config):
            event("delivered: " + kind)
            assert deliver(receiver, wire.data) == wire.plaintext
            assert deliver(twin, wire.data) == wire.plaintext
            self.in_flight.remove(wire)
            self.delivered.append(wire)
            model.heard_back = True
        else:
            assert not self.within_limits, "a fresh message within the limits was refused"
            event("refused: " + kind)
            refused(receiver, wire.data)  # it stays in flight and may be retried
            refused(twin, wire.data)

    def deliver_newest(self, data: st.DataObject) -> None:
        """The newest message in flight overtakes all others (to skip many keys)."""
        if self.in_flight:
            self.deliver(data, self.in_flight[-1])

    def drop(self, data: st.DataObject) -> None:
        if self.in_flight:
            self.in_flight.remove(data.draw(st.sampled_from(self.in_flight), label="dropped"))

    def duplicate(self, data: st.DataObject) -> None:
        """A message already read arrives again."""
        if not self.delivered:
            return
        wire = data.draw(st.sampled_from(self.delivered), label="duplicate")
        assert not self.models[wire.receiver].receive(wire, self.config)
        refused(self.sessions[wire.receiver], wire.data)
        refused(self.twins[wire.receiver], wire.data)
        event("duplicate refused")

    def tamper(self, data: st.DataObject) -> None:
        """A message in flight arrives with one bit flipped; the real one may follow."""
        if not self.in_flight:
            return
        wire = data.draw(st.sampled_from(self.in_flight), label="tampered")
        size = len(IncomingMessage.decode(wire.data).ratchet_message)  # the last field
        index = len(wire.data) - size + data.draw(st.integers(0, size - 1), label="byte")
        bit = 1 << data.draw(st.integers(0, 7), label="bit")
        forged = bytearray(wire.data)
        forged[index] ^= bit
        refused(self.sessions[wire.receiver], bytes(forged))
        refused(self.twins[wire.receiver], bytes(forged))

    def restore(self, data: st.DataObject) -> None:
        """A party is saved and loaded again: the whole session or its ratchet."""
        who = data.draw(st.sampled_from(PARTIES), label="restored")
        session = self.sessions[who]
        saved = session.serialize()
        if data.draw(st.booleans(), label="whole session"):
            session = Session.deserialize(saved, self.randoms[who], self.config)
        else:
            state = session.ratchet.serialize()
            session.ratchet = RatchetState.deserialize(state, self.config, self.randoms[who])
            assert session.ratchet.serialize() == state
        assert session.serialize() == saved
        self.sessions[who] = session

    def steal(self, data: st.DataObject) -> None:
        """Someone copies a party's saved state; from now on it reads the wire."""
        if not self.within_limits or len(self.thieves) >= self.max_thieves:
            return
        victim = data.draw(st.sampled_from(PARTIES), label="victim")
        thief_random = SeededRandom(b"thief%d" % len(self.thieves) + self.seed)
        thief = Thief(
            victim,
            Session.deserialize(self.sessions[victim].serialize(), thief_random, self.config),
            self.models[victim].recv_epoch,
            {wire.number for wire in self.delivered if wire.receiver == victim},
        )
        self.thieves.append(thief)
        for wire in self.sent:  # the thief recorded the wire, dropped messages too
            if wire.receiver == victim:
                thief.follow(wire)

    def delivery_kind(self, wire: Wire) -> str:
        model = self.models[wire.receiver]
        if (wire.epoch, wire.n) in model.skipped:
            return "skipped key"
        if wire.epoch == model.recv_epoch:
            return "current chain" if wire.n >= model.nr else "evicted (current chain)"
        if wire.epoch == model.recv_epoch + 1:
            return "DH step" + (" after skipping" if wire.n or wire.pn > model.nr else "")
        return "evicted (old chain)"

    # -- invariants --

    @invariant()
    def restored_parties_match_their_twins(self) -> None:
        for who in self.sessions:
            assert self.sessions[who].serialize() == self.twins[who].serialize()

    @invariant()
    def skipped_keys_match_the_model(self) -> None:
        for who, session in self.sessions.items():
            skipped = session.ratchet.skipped
            expected = self.models[who].skipped
            assert len(skipped) <= self.config.max_skipped_total
            assert shape(skipped) == shape(expected)
            if not self.config.header_encryption:  # chains are named by the sender's DH key
                peer = other(who)
                assert list(skipped) == [(self.dh_keys[peer, e], n) for e, n in expected]

    def check_header(self, sender: str, epoch: int, pn: int, n: int, message: bytes) -> None:
        if self.config.header_encryption:
            assert len(message) >= 1 + self.config.header_size
            return
        dh, real_pn, real_n = struct.unpack(">32sII", message[1:41])
        assert (real_pn, real_n) == (pn, n)
        assert self.dh_keys.setdefault((sender, epoch), dh) == dh
        assert list(self.dh_keys.values()).count(dh) == 1


class ClassicConversation(Conversation):
    config = CLASSIC


class TightConversation(Conversation):
    """Limits small enough that refusals and evictions happen all the time."""

    config = tight(PIGEON, per_chain=3, total=4)
    within_limits = False
    max_in_flight = 16


class TightClassicConversation(TightConversation):
    config = tight(CLASSIC, per_chain=3, total=4)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=50,
        deadline=None,
        derandomize=True,
        database=None,
    )


TestConversation = Conversation.TestCase
TestConversation.settings = _settings(100)
TestClassicConversation = ClassicConversation.TestCase
TestClassicConversation.settings = _settings(60)
TestTightConversation = TightConversation.TestCase
TestTightConversation.settings = _settings(80)
TestTightClassicConversation = TightClassicConversation.TestCase
TestTightClassicConversation.settings = _settings(60)


# -- forward secrecy ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_a_snapshot_cannot_reopen_messages_whose_keys_were_used(config):
    a, b, first = start(config)
    first_chain = [a.encrypt(b"one %d" % i) for i in range(4)]
    for i in (0, 3, 2):  # 1 stays behind in the skipped store
        assert deliver(b, first_chain[i]) == b"one %d" % i
    assert deliver(a, b.encrypt(b"turn")) == b"turn"
    second_chain = [a.encrypt(b"two %d" % i) for i in range(3)]
    for i in (1, 0, 2):
        assert deliver(b, second_chain[i]) == b"two %d" % i
    snapshot = b.serialize()  # just after Bob read message N = second_chain[2]

    used = [second_chain[2], *second_chain[:2], *first_chain[2:], first_chain[0], first]
    for message in used:
        refused(Session.deserialize(snapshot, os.urandom, config), message)
    # The snapshot is real: the one key Bob has not used yet still opens its message.
    thief = Session.deserialize(snapshot, os.urandom, config)
    assert deliver(thief, first_chain[1]) == b"one 1"
    for message in used:
        refused(thief, message)


# -- post-compromise security -------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bob_knows_alices_chain", [True, False], ids=["mid-chain", "new-chain"])
def test_a_stolen_state_stops_working_after_the_healing_round_trip(config, bob_knows_alices_chain):
    a, b = established(config)  # Alice's next message starts a new DH step
    if bob_knows_alices_chain:
        assert deliver(b, a.encrypt(b"before the theft")) == b"before the theft"
    stolen = b.serialize()
    thief = Session.deserialize(stolen, SeededRandom(b"the thief's own"), config)

    def alice_says(text: bytes, thief_reads: bool) -> None:
        message = a.encrypt(text)
        if thief_reads:
            assert deliver(thief, message) == text
        else:
            refused(thief, message)
            refused(Session.deserialize(stolen, os.urandom, config), message)
        assert deliver(b, message) == text

    # Alice's next messages still use keys the snapshot holds: it is real.
    alice_says(b"next", thief_reads=True)
    alice_says(b"next again", thief_reads=True)
    if bob_knows_alices_chain:
        # Bob's reply uses the DH key he made before the theft, so Alice's new
        # chain is derived from a stolen key: the thief still follows.
        assert deliver(a, b.encrypt(b"reply with a stolen key")) == b"reply with a stolen key"
        alice_says(b"a chain from a stolen key", thief_reads=True)
    # Bob has now made a DH key after the theft; once Alice ratchets on it the
    # thief, although it saw every message Alice sent, is locked out for good.
    assert deliver(a, b.encrypt(b"reply with a fresh key")) == b"reply with a fresh key"
    for i in range(3):
        alice_says(b"healed %d" % i, thief_reads=False)
    assert deliver(a, b.encrypt(b"and again")) == b"and again"
    alice_says(b"still healed", thief_reads=False)


# -- skipped-key limits -------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_the_per_chain_skip_limit_in_a_new_chain(config):
    """Production limit: skipping exactly 1000 keys is fine, 1001 is refused."""
    a, b = established(config)
    limit = config.max_skip_per_chain
    chain = [a.encrypt(b"m%d" % i) for i in range(limit + 2)]
    refused(b, chain[limit + 1])  # a DH step that would skip limit + 1 keys
    assert deliver(b, chain[limit]) == b"m%d" % limit
    assert len(b.ratchet.skipped) == limit
    assert deliver(b, chain[limit + 1]) == b"m%d" % (limit + 1)
    assert deliver(b, chain[0]) == b"m0"
    assert len(b.ratchet.skipped) == limit - 1


@pytest.mark.parametrize("config", CONFIGS)
def test_the_per_chain_skip_limit_in_the_current_chain(config):
    config = tight(config, per_chain=5, total=50)
    a, b, _ = start(config)
    chain = [a.encrypt(b"m%d" % i) for i in range(1, 9)]  # numbers 1..8; Bob expects 1
    refused(b, chain[6])  # number 7 would skip 1..6
    b = restore(b, config)
    assert deliver(b, chain[5]) == b"m6"  # number 6 skips exactly 5
    assert deliver(b, chain[7]) == b"m8"
    assert [n for _, n in b.ratchet.skipped] == [1, 2, 3, 4, 5, 7]


@pytest.mark.parametrize("config", CONFIGS)
def test_the_per_chain_skip_limit_for_the_end_of_the_previous_chain(config):
    """The previous-chain length in a header can make a DH step skip too far."""
    config = tight(config, per_chain=5, total=50)
    a, b = established(config)
    old = [a.encrypt(b"old %d" % i) for i in range(7)]
    assert deliver(b, old[0]) == b"old 0"
    assert deliver(a, b.encrypt(b"turn")) == b"turn"
    new = a.encrypt(b"new chain")  # says 7 were sent before it; Bob has read 1
    refused(b, new)
    assert deliver(b, old[1]) == b"old 1"  # now only 5 remain to skip
    assert deliver(b, new) == b"new chain"
    for i in range(2, 7):
        assert deliver(b, old[i]) == b"old %d" % i
    assert not b.ratchet.skipped


@pytest.mark.parametrize("config", CONFIGS)
def test_the_total_cap_evicts_the_oldest_skipped_keys(config):
    config = tight(config, per_chain=10, total=8)
    a, b = established(config)
    first = [a.encrypt(b"first %d" % i) for i in range(6)]
    assert deliver(b, first[5]) == b"first 5"  # skips 0..4
    assert deliver(b, first[0]) == b"first 0"  # frees a slot: 1..4 stored
    b = restore(b, config)  # age order survives a restore
    assert deliver(a, b.encrypt(b"turn")) == b"turn"
    second = [a.encrypt(b"second %d" % i) for i in range(7)]
    assert deliver(b, second[6]) == b"second 6"  # skips 0..5: 10 keys, cap 8
    assert len(b.ratchet.skipped) == 8
    for message in first[1:3]:  # the two oldest went
        refused(b, message)
    for i in (4, 3):
        assert deliver(b, first[i]) == b"first %d" % i
    for i in (5, 0, 1, 2, 3, 4):
        assert deliver(b, second[i]) == b"second %d" % i
    assert not b.ratchet.skipped


# -- edge cases ---------------------------------------------------------------


def test_the_responder_cannot_encrypt_before_receiving():
    alice, bob, ad = ratchet_pair(PIGEON)
    before = bob.serialize()
    with pytest.raises(LocalProtocolError):
        bob.encrypt(b"too early", ad)
    assert bob.serialize() == before
    assert bob.decrypt(alice.encrypt(b"hi", ad), ad) == b"hi"
    assert alice.decrypt(bob.encrypt(b"now I can", ad), ad) == b"now I can"


@pytest.mark.parametrize("config", CONFIGS)
def test_a_message_from_an_old_chain_decrypts_after_two_dh_steps(config):
    a, b = established(config)
    late = a.encrypt(b"late")
    assert deliver(b, a.encrypt(b"overtakes it")) == b"overtakes it"
    for i in range(2):  # two more round trips: both sides step twice
        assert deliver(a, b.encrypt(b"bob %d" % i)) == b"bob %d" % i
        assert deliver(b, a.encrypt(b"alice %d" % i)) == b"alice %d" % i
        b = restore(b, config)
    assert len(b.ratchet.skipped) == 1
    assert deliver(b, late) == b"late"
    assert not b.ratchet.skipped
    refused(b, late)


@pytest.mark.parametrize("path", ["dh-step", "current-chain", "skipped"])
def test_header_encryption_binds_the_associated_data(path):
    alice, bob, ad = ratchet_pair(PIGEON)
    wrong_ads = [b"", ad[32:] + ad[:32], ad[:-1] + bytes([ad[-1] ^ 1]), ad + b"x"]
    messages = [alice.encrypt(b"m%d" % i, ad) for i in range(3)]
    if path != "dh-step":
        assert bob.decrypt(messages[2], ad) == b"m2"  # Bob steps, 0 and 1 are skipped
    if path == "current-chain":
        messages.append(alice.encrypt(b"m3", ad))
    target = {"dh-step": 0, "current-chain": 3, "skipped": 0}[path]
    before = bob.serialize()
    for wrong in wrong_ads:
        with pytest.raises(DecryptError):
            bob.decrypt(messages[target], wrong)
        assert bob.serialize() == before
    assert bob.decrypt(messages[target], ad) == b"m%d" % target
