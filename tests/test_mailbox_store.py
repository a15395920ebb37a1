"""The mailbox's store and protocol handler over a real database, without a
network: quotas, rate limit, expiry, owner-only pickup, replayed proofs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from helpers import HeldDatabase
from pigeon.node.mailbox import MailboxLimits, MailboxService, MailboxStore
from pigeon.node.storage import Database
from pigeon.protocol import ProtocolError
from pigeon.protocol.envelope import MAX_ENVELOPE
from pigeon.protocol.mailbox import (
    MAX_ITEMS,
    MAX_PAGE_BYTES,
    MAX_RESPONSE_SIZE,
    Op,
    Request,
    Response,
    mailbox_id,
    proof_message,
)

LIMITS = MailboxLimits(quota_messages=5, quota_bytes=5000, deposits_per_minute=8)


@pytest.fixture
def service(tmp_path: Path) -> MailboxService:
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    return MailboxService(MailboxStore(db, LIMITS), LIMITS)


def ask(service: MailboxService, request: Request, peer: str = "peer") -> Response:
    return Response.decode(service.answer(request.encode(), peer).encode())


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


def test_a_pickup_is_paged_by_bytes_and_count(tmp_path: Path):
    """Whatever a mailbox holds, one FETCH reply stays under the owner's
    frame limit: items up to MAX_PAGE_BYTES (one alone when larger) or
    MAX_ITEMS, and ``more`` says whether to ask again."""
    limits = MailboxLimits(quota_messages=10_000, quota_bytes=1 << 30, deposits_per_minute=10**6)
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    service = MailboxService(MailboxStore(db, limits), limits)
    key, box = register(service)
    big = [os.urandom(MAX_ENVELOPE) for _ in range(3)]  # each over a page alone
    middling = [os.urandom(300_000) for _ in range(5)]
    small = [b"s%04d" % i for i in range(MAX_ITEMS + 10)]
    for envelope in big + middling + small:
        assert ask(service, Request(Op.DEPOSIT, box, envelope=envelope)).ok
    pages = []
    while True:
        request = proven(service, key, Op.FETCH, box)
        encoded = service.answer(request.encode(), "owner").encode()
        assert len(encoded) <= MAX_RESPONSE_SIZE
        reply = Response.decode(encoded)
        pages.append([item.envelope for item in reply.items])
        ids = [item.item_id for item in reply.items]
        assert ask(service, proven(service, key, Op.DELETE, box, ids)).ok
        if not reply.more:
            break
    assert [len(page) for page in pages[:3]] == [1, 1, 1]  # one large envelope each
    assert all(sum(map(len, page)) <= MAX_PAGE_BYTES for page in pages[3:])
    assert all(len(page) <= MAX_ITEMS for page in pages)
    assert [e for page in pages for e in page] == big + middling + small  # all, in order, once
    assert pages[-1] and ask(service, proven(service, key, Op.FETCH, box)).items == ()


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
    """Two connections to one SQLCipher mailbox database, each answering one
    sender from its own thread, race for the last prekey.

    Alice's take is held between reading the prekey and deleting it while
    Carol's request is answered on the other connection.  Carol must wait for
    Alice's transaction and find none left.  Without the transaction (or with
    one that takes the write lock only at the DELETE) Carol reads the same
    prekey in that window, and both are handed it."""
    from pigeon.protocol import IdentityKeyPair, OneTimePrekey

    home = tmp_path / "race"
    first = MailboxService(
        MailboxStore(HeldDatabase.create(home, "pw", fast_kdf=True), LIMITS), LIMITS
    )
    # the owner's side is not what races here: set the mailbox up in the store
    box = first.store.register(bytes(SigningKey(os.urandom(32)).verify_key), 0)
    identity = IdentityKeyPair.generate(os.urandom)
    prekey = OneTimePrekey.create(identity, 1, os.urandom)[0].encode()
    assert first.store.add_prekeys(box, (prekey,)) == 1
    second = MailboxService(MailboxStore(Database.open(home, "pw"), LIMITS), LIMITS)
    take = Request(Op.TAKE_PREKEY, box).encode()

    alice_has_read, carol_answered = threading.Event(), threading.Event()
    held: list[bool] = []

    def hold() -> None:
        held.append(True)
        alice_has_read.set()
        # Carol is answered at once if nothing stops her; behind Alice's write
        # lock she cannot be (the busy timeout is 5 s), so give up after a while.
        carol_answered.wait(timeout=1.0)

    first.store.db.hold = hold
    got: dict[str, bytes | BaseException] = {}

    def prekey_for(name: str, service: MailboxService) -> bytes:
        reply = service.answer(take, name)
        assert reply.ok, reply.error
        return reply.prekey

    def alice() -> None:
        try:
            got["alice"] = prekey_for("alice", first)
        except BaseException as error:
            got["alice"] = error
            alice_has_read.set()

    def carol() -> None:
        try:
            assert alice_has_read.wait(timeout=10)
            got["carol"] = prekey_for("carol", second)
        except BaseException as error:
            got["carol"] = error
        finally:
            carol_answered.set()

    threads = [threading.Thread(target=alice), threading.Thread(target=carol)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    first.store.db.close()
    second.store.db.close()
    assert held == [True]  # the race window was really open once
    assert sorted(got) == ["alice", "carol"], "a sender's thread did not finish"
    errors = {name: value for name, value in got.items() if isinstance(value, BaseException)}
    assert not errors, f"a sender got an error, not an answer: {errors}"
    winners = sorted(name for name, value in got.items() if value)
    assert len(winners) == 1, f"the last prekey was handed to {winners or 'nobody'}"
    assert got[winners[0]] == prekey


def test_only_the_owner_adds_prekeys(service):
    _, box = register(service)
    stranger = SigningKey(os.urandom(32))
    nonce = ask(service, Request(Op.CHALLENGE, box)).nonce
    signature = stranger.sign(proof_message(Op.ADD_PREKEYS, box, nonce, (b"x",))).signature
    reply = ask(
        service, Request(Op.ADD_PREKEYS, box, nonce=nonce, signature=signature, prekeys=(b"x",))
    )
    assert not reply.ok and reply.error == "proof refused"
