"""The mailbox's store and protocol handler over a real database, without a
network: quotas, rate limit, expiry, owner-only pickup, replayed proofs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from pigeon.node.mailbox import MailboxLimits, MailboxService, MailboxStore
from pigeon.node.storage import Database
from pigeon.protocol import ProtocolError
from pigeon.protocol.envelope import MAX_ENVELOPE
from pigeon.protocol.mailbox import Op, Request, Response, mailbox_id, proof_message

LIMITS = MailboxLimits(quota_messages=5, quota_bytes=5000, deposits_per_minute=8)


@pytest.fixture
def service(tmp_path: Path) -> MailboxService:
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    return MailboxService(MailboxStore(db, LIMITS), LIMITS)


def ask(service: MailboxService, request: Request, peer: str = "peer") -> Response:
    return Response.decode(service.answer(request.encode(), peer).encode(), MAX_ENVELOPE)


def register(service: MailboxService) -> tuple[SigningKey, bytes]:
    key = SigningKey(os.urandom(32))
    reply = ask(service, Request(Op.REGISTER, public_key=bytes(key.verify_key)))
    assert reply.ok and reply.item_id == mailbox_id(bytes(key.verify_key))
    return key, reply.item_id


def proven(service: MailboxService, key: SigningKey, op: Op, box: bytes, ids=()) -> Request:
    nonce = ask(service, Request(Op.CHALLENGE, box)).nonce
    signature = key.sign(proof_message(op, box, nonce, tuple(ids))).signature
    return Request(op, box, nonce=nonce, signature=signature, item_ids=tuple(ids))


def test_deposit_fetch_delete(service):
    key, box = register(service)
    for i in range(3):
        assert ask(service, Request(Op.DEPOSIT, box, envelope=b"sealed %d" % i)).ok
    items = ask(service, proven(service, key, Op.FETCH, box)).items
    assert [i.envelope for i in items] == [b"sealed 0", b"sealed 1", b"sealed 2"]
    assert ask(service, proven(service, key, Op.DELETE, box, [i.item_id for i in items])).ok
    assert ask(service, proven(service, key, Op.FETCH, box)).items == ()


def test_a_stranger_cannot_fetch_or_delete(service):
    key, box = register(service)
    ask(service, Request(Op.DEPOSIT, box, envelope=b"for the owner"))
    stranger = SigningKey(os.urandom(32))
    for op in (Op.FETCH, Op.DELETE):
        reply = ask(service, proven(service, stranger, op, box, [b"\0" * 16]))
        assert not reply.ok and reply.error == "proof refused"
    assert len(ask(service, proven(service, key, Op.FETCH, box)).items) == 1


def test_a_replayed_proof_fails(service):
    key, box = register(service)
    ask(service, Request(Op.DEPOSIT, box, envelope=b"x"))
    request = proven(service, key, Op.FETCH, box)
    assert ask(service, request).ok
    replay = ask(service, request)
    assert not replay.ok and replay.error == "proof refused"


def test_a_proof_for_another_operation_fails(service):
    key, box = register(service)
    ask(service, Request(Op.DEPOSIT, box, envelope=b"x"))
    fetch = proven(service, key, Op.FETCH, box)
    as_delete = Request(Op.DELETE, box, nonce=fetch.nonce, signature=fetch.signature)
    assert not ask(service, as_delete).ok


def test_quota_refuses_with_a_clear_error(service):
    _, box = register(service)
    for _ in range(LIMITS.quota_messages):
        assert ask(service, Request(Op.DEPOSIT, box, envelope=b"m"), peer=os.urandom(4)).ok
    reply = ask(service, Request(Op.DEPOSIT, box, envelope=b"m"), peer="late")
    assert not reply.ok and reply.error == "the recipient's mailbox is full; try again later"
    _, other = register(service)
    big = ask(service, Request(Op.DEPOSIT, other, envelope=b"x" * 6000))
    assert not big.ok and "full" in big.error


def test_rate_limit_per_depositor(service):
    _, box = register(service)
    _, box2 = register(service)
    replies = [
        ask(service, Request(Op.DEPOSIT, box if i % 2 else box2, envelope=b"m"), peer="eager")
        for i in range(LIMITS.deposits_per_minute + 1)
    ]
    assert all(r.ok for r in replies[:-1])
    assert not replies[-1].ok and replies[-1].error.startswith("rate limit: at most 8 deposits")
    assert ask(service, Request(Op.DEPOSIT, box, envelope=b"m"), peer="someone else").ok


def test_unknown_mailbox_is_refused(service):
    reply = ask(service, Request(Op.DEPOSIT, b"\1" * 16, envelope=b"m"))
    assert not reply.ok and reply.error == "no such mailbox here"


def test_expired_envelopes_are_really_deleted(service, tmp_path: Path):
    key, box = register(service)
    ask(service, Request(Op.DEPOSIT, box, envelope=b"short lived secret", ttl_s=10))
    store = service.store
    import time

    assert store.expire(int(time.time()) + 11) == 1
    assert ask(service, proven(service, key, Op.FETCH, box)).items == ()
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.execute("VACUUM")
    store.db.close()
    reopened = Database.open(tmp_path / "box", "pw")
    assert reopened.one("SELECT count(*) FROM mailbox_items")[0] == 0
    reopened.close()


def test_ttl_is_capped(service):
    _, box = register(service)
    ask(service, Request(Op.DEPOSIT, box, envelope=b"m", ttl_s=10**9))
    deposited, expires = service.store.db.one("SELECT deposited_at, expires_at FROM mailbox_items")
    assert expires - deposited == LIMITS.max_ttl


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_requests_get_a_refusal_not_a_crash(tmp_path_factory, data):
    service = _shared_service(tmp_path_factory)
    try:
        reply = service.answer(data, "fuzzer")
    except ProtocolError:
        return  # the stream handler logs it and closes the stream
    assert isinstance(reply, Response)


_SERVICES: list[MailboxService] = []


def _shared_service(factory: pytest.TempPathFactory) -> MailboxService:
    if not _SERVICES:
        db = Database.create(factory.mktemp("fuzzbox") / "box", "pw", fast_kdf=True)
        _SERVICES.append(MailboxService(MailboxStore(db, LIMITS), LIMITS))
    return _SERVICES[0]


def add_prekeys(service: MailboxService, key: SigningKey, box: bytes, count: int) -> int:
    from pigeon.protocol import IdentityKeyPair, OneTimePrekey

    identity = IdentityKeyPair.generate(os.urandom)
    prekeys = tuple(
        OneTimePrekey.create(identity, i, os.urandom)[0].encode() for i in range(1, count + 1)
    )
    nonce = ask(service, Request(Op.CHALLENGE, box)).nonce
    signature = key.sign(proof_message(Op.ADD_PREKEYS, box, nonce, prekeys)).signature
    reply = ask(
        service, Request(Op.ADD_PREKEYS, box, nonce=nonce, signature=signature, prekeys=prekeys)
    )
    assert reply.ok
    return reply.prekeys_left


def test_one_time_prekeys_are_handed_out_once(service):
    key, box = register(service)
    assert add_prekeys(service, key, box, 5) == 5
    taken = [ask(service, Request(Op.TAKE_PREKEY, box), peer=f"s{i}").prekey for i in range(7)]
    handed = [p for p in taken if p]
    assert len(handed) == 5 and len(set(handed)) == 5
    assert taken[5:] == [b"", b""]  # none left: the sender falls back to three DHs


def test_two_senders_racing_for_the_last_prekey(tmp_path: Path):
    """Two connections to one mailbox daemon's store, as two trio tasks."""
    import trio

    db = Database.create(tmp_path / "race", "pw", fast_kdf=True)
    service = MailboxService(MailboxStore(db, LIMITS), LIMITS)
    key, box = register(service)
    add_prekeys(service, key, box, 1)
    got: list[bytes] = []

    async def sender(name: str) -> None:
        await trio.sleep(0)
        got.append(ask(service, Request(Op.TAKE_PREKEY, box), peer=name).prekey)

    async def race() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, "alice")
            nursery.start_soon(sender, "carol")

    trio.run(race)
    assert sorted(bool(p) for p in got) == [False, True]


def test_only_the_owner_adds_prekeys(service):
    _, box = register(service)
    stranger = SigningKey(os.urandom(32))
    nonce = ask(service, Request(Op.CHALLENGE, box)).nonce
    signature = stranger.sign(proof_message(Op.ADD_PREKEYS, box, nonce, (b"x",))).signature
    reply = ask(
        service, Request(Op.ADD_PREKEYS, box, nonce=nonce, signature=signature, prekeys=(b"x",))
    )
    assert not reply.ok and reply.error == "proof refused"
