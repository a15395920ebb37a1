"""Property tests of sessions: random interleavings of both directions with
drops, reordering, duplicates and save/restore at any point; forward secrecy
and post-compromise security; the skipped-key bounds."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from helpers import deliver, session_pair
from pigeon.protocol import CLASSIC, PIGEON, DecryptError, RatchetConfig, Session
from pigeon.protocol.ratchet import RatchetState


class Conversation(RuleBasedStateMachine):
    """A model: messages in flight per direction, each delivered at most once."""

    config: RatchetConfig = PIGEON

    def __init__(self) -> None:
        super().__init__()
        a, b = session_pair(self.config)
        self.sessions = {"a": a, "b": b}
        self.in_flight: dict[str, list[tuple[bytes, bytes]]] = {"a": [], "b": []}  # to receiver
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}
        self.counter = 0

    @rule(sender=st.sampled_from(["a", "b"]))
    def send(self, sender: str) -> None:
        receiver = "b" if sender == "a" else "a"
        if len(self.in_flight[receiver]) >= 40:
            return
        self.counter += 1
        text = b"message %d" % self.counter
        self.in_flight[receiver].append((self.sessions[sender].encrypt(text), text))

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def deliver_one(self, data: st.DataObject) -> None:
        receiver = data.draw(st.sampled_from([r for r in "ab" if self.in_flight[r]]))
        index = data.draw(st.integers(0, len(self.in_flight[receiver]) - 1))
        message, text = self.in_flight[receiver].pop(index)
        assert deliver(self.sessions[receiver], message) == text
        self.delivered[receiver].append(message)

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def drop_one(self, data: st.DataObject) -> None:
        receiver = data.draw(st.sampled_from([r for r in "ab" if self.in_flight[r]]))
        self.in_flight[receiver].pop(data.draw(st.integers(0, len(self.in_flight[receiver]) - 1)))

    @precondition(lambda self: any(self.delivered.values()))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        receiver = data.draw(st.sampled_from([r for r in "ab" if self.delivered[r]]))
        message = data.draw(st.sampled_from(self.delivered[receiver]))
        session = self.sessions[receiver]
        before = session.serialize()
        with pytest.raises(DecryptError):
            deliver(session, message)
        assert session.serialize() == before

    @rule(who=st.sampled_from(["a", "b"]))
    def save_and_restore(self, who: str) -> None:
        saved = self.sessions[who].serialize()
        restored = Session.deserialize(saved, os.urandom, self.config)
        assert restored.serialize() == saved
        self.sessions[who] = restored

    @invariant()
    def skipped_keys_stay_bounded(self) -> None:
        for session in self.sessions.values():
            assert len(session.ratchet.skipped) <= self.config.max_skipped_total


class ClassicConversation(Conversation):
    config = CLASSIC


TestConversation = Conversation.TestCase
TestConversation.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClassicConversation = ClassicConversation.TestCase
TestClassicConversation.settings = settings(max_examples=25, stateful_step_count=40, deadline=None)


def test_forward_secrecy_a_later_snapshot_cannot_read_earlier_messages():
    a, b = session_pair()
    old = [a.encrypt(b"old %d" % i) for i in range(3)]
    deliver(a, b.encrypt(b"reply"))
    older_chain = a.encrypt(b"in a newer chain")
    for message in old:
        deliver(b, message)
    deliver(b, older_chain)
    snapshot = b.serialize()
    for message in [*old, older_chain]:
        thief = Session.deserialize(snapshot, os.urandom)
        with pytest.raises(DecryptError):
            deliver(thief, message)


def test_post_compromise_security_after_one_round_trip():
    a, b = session_pair()
    stolen = b.serialize()
    # the thief follows the conversation until both sides take fresh DH steps
    same_chain = a.encrypt(b"still readable")
    thief = Session.deserialize(stolen, os.urandom)
    assert deliver(thief, same_chain) == b"still readable"
    deliver(b, same_chain)
    reply = b.encrypt(b"bob replies with a fresh key")
    deliver(a, reply)
    after = a.encrypt(b"after the round trip")
    assert deliver(b, after) == b"after the round trip"
    for candidate in (Session.deserialize(stolen, os.urandom), thief):
        with pytest.raises(DecryptError):
            deliver(candidate, after)


@pytest.mark.parametrize("config", [PIGEON, CLASSIC], ids=["pigeon", "classic"])
def test_skipping_too_far_is_refused_without_state_change(config):
    a, b = session_pair(config)
    for _ in range(config.max_skip_per_chain + 1):
        a.encrypt(b"lost")
    too_far = a.encrypt(b"too far")
    before = b.serialize()
    with pytest.raises(DecryptError):
        deliver(b, too_far)
    assert b.serialize() == before


def test_the_oldest_skipped_keys_are_evicted_first():
    config = RatchetConfig(PIGEON.labels, True, max_skip_per_chain=10, max_skipped_total=15)
    a, b = session_pair(config)
    chains = []
    for _ in range(2):  # two chains of 10 each, delivering only the last of each
        chain = [a.encrypt(b"m%d" % i) for i in range(10)]
        deliver(b, chain[-1])
        deliver(a, b.encrypt(b"turn"))
        chains.append(chain)
    assert len(b.ratchet.skipped) == 15  # 9 + 9 stored, the 3 oldest evicted
    for message in chains[0][:3]:
        with pytest.raises(DecryptError):
            deliver(b, message)
    for i, message in enumerate(chains[0][3:9], start=3):
        assert deliver(b, message) == b"m%d" % i
    for i, message in enumerate(chains[1][:9]):
        assert deliver(b, message) == b"m%d" % i


def test_the_responder_cannot_send_before_it_has_received():
    from pigeon.protocol import LocalProtocolError

    shared = os.urandom(PIGEON.x3dh_output_size)
    bob = RatchetState.responder(PIGEON, shared, os.urandom(32), os.urandom)
    with pytest.raises(LocalProtocolError):
        bob.encrypt(b"too early", b"ad")
