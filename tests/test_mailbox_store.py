"""The mailbox's store and protocol handler over a real database, without a
network: quotas, rate limit, expiry, owner-only pickup, replayed proofs;
deposits stored in groups; an owner's collection against it."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
import sqlcipher3
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey

from helpers import HeldDatabase, deposit_token, register_request, work_start
from pigeon.node.framing import frame
from pigeon.node.mailbox_owner import MailboxOwner
from pigeon.node.mailbox_service import GroupCommit, MailboxService
from pigeon.node.mailbox_store import (
    STRANGERS,
    Deposit,
    MailboxLimits,
    MailboxRefused,
    MailboxStore,
)
from pigeon.node.storage import Database
from pigeon.protocol import ProtocolError
from pigeon.protocol.envelope import MAX_ENVELOPE
from pigeon.protocol.frames import AckStatus
from pigeon.protocol.mailbox import (
    MAX_ITEMS,
    MAX_PAGE_BYTES,
    MAX_RESPONSE_SIZE,
    REGISTER_WORK_BITS,
    TAKE_PREKEY_WORK_BITS,
    Item,
    Op,
    Request,
    Response,
    deposit_work_bits,
    do_work,
    mailbox_id,
    proof_message,
    work_done,
)
from pigeon.protocol.wire import decode_varint

# Proofs of work 12 bits cheaper than on the network: cheap, but not free, so
# a request without one is still refused.
LIMITS = MailboxLimits(quota_messages=5, quota_bytes=5000, deposits_per_minute=8, work_discount=12)


@pytest.fixture
def service(tmp_path: Path) -> MailboxService:
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    return MailboxService(MailboxStore(db, LIMITS), LIMITS)


def ask(service: MailboxService, request: Request, peer: str = "peer") -> Response:
    return Response.decode(service.answer(request.encode(), peer).encode())


def register(service: MailboxService) -> tuple[SigningKey, bytes]:
    key = SigningKey(os.urandom(32))
    request = register_request(key, service.limits.work_bits(REGISTER_WORK_BITS))
    reply = ask(service, request)
    assert reply.ok and reply.item_id == mailbox_id(request.public_key)
    return key, reply.item_id


def paid(service: MailboxService, box: bytes, envelope: bytes, ttl: int = 0) -> Request:
    """A deposit paid for with (cheap) work, as a stranger pays."""
    bits = service.limits.work_bits(deposit_work_bits(len(envelope)))
    work = do_work(Op.DEPOSIT, box, envelope, bits, work_start())
    return Request(Op.DEPOSIT, box, envelope=envelope, ttl_s=ttl, work=work)


token_for = deposit_token


def take(service: MailboxService, box: bytes, *, token: bytes = b"") -> Request:
    if token:
        return Request(Op.TAKE_PREKEY, box, token=token)
    window = int(time.time() // 60)
    bits = service.limits.work_bits(TAKE_PREKEY_WORK_BITS)
    work = do_work(Op.TAKE_PREKEY, box, struct.pack(">Q", window), bits, work_start())
    return Request(Op.TAKE_PREKEY, box, work=work, window=window)


def proven(service: MailboxService, key: SigningKey, op: Op, box: bytes, ids=()) -> Request:
    nonce = ask(service, Request(Op.CHALLENGE, box)).nonce
    signature = key.sign(proof_message(op, box, nonce, tuple(ids))).signature
    return Request(op, box, nonce=nonce, signature=signature, item_ids=tuple(ids))


def test_deposit_fetch_delete(service):
    key, box = register(service)
    for i in range(3):
        assert ask(service, paid(service, box, b"sealed %d" % i)).ok
    items = ask(service, proven(service, key, Op.FETCH, box)).items
    assert [i.envelope for i in items] == [b"sealed 0", b"sealed 1", b"sealed 2"]
    assert ask(service, proven(service, key, Op.DELETE, box, [i.item_id for i in items])).ok
    assert ask(service, proven(service, key, Op.FETCH, box)).items == ()


def test_a_pickup_is_paged_by_bytes_and_count(tmp_path: Path):
    """Whatever a mailbox holds, one FETCH reply stays under the owner's
    frame limit: items up to MAX_PAGE_BYTES (one alone when larger) or
    MAX_ITEMS, and ``more`` says whether to ask again."""
    limits = MailboxLimits(
        quota_messages=10_000,
        quota_bytes=1 << 30,
        deposits_per_minute=10**6,
        work_discount=LIMITS.work_discount,
    )
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    service = MailboxService(MailboxStore(db, limits), limits)
    key, box = register(service)
    big = [os.urandom(MAX_ENVELOPE) for _ in range(3)]  # each over a page alone
    middling = [os.urandom(300_000) for _ in range(5)]
    small = [b"s%04d" % i for i in range(MAX_ITEMS + 10)]
    for envelope in big + middling + small:
        assert ask(service, paid(service, box, envelope)).ok
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
    ask(service, paid(service, box, b"for the owner"))
    stranger = SigningKey(os.urandom(32))
    for op in (Op.FETCH, Op.DELETE):
        reply = ask(service, proven(service, stranger, op, box, [b"\0" * 16]))
        assert not reply.ok and reply.error == "proof refused"
    assert len(ask(service, proven(service, key, Op.FETCH, box)).items) == 1


def test_a_replayed_proof_fails(service):
    key, box = register(service)
    ask(service, paid(service, box, b"x"))
    request = proven(service, key, Op.FETCH, box)
    assert ask(service, request).ok
    replay = ask(service, request)
    assert not replay.ok and replay.error == "proof refused"


def test_a_proof_for_another_operation_fails(service):
    key, box = register(service)
    ask(service, paid(service, box, b"x"))
    fetch = proven(service, key, Op.FETCH, box)
    as_delete = Request(Op.DELETE, box, nonce=fetch.nonce, signature=fetch.signature)
    assert not ask(service, as_delete).ok


def test_quota_refuses_with_a_clear_error(service):
    _, box = register(service)
    for i in range(LIMITS.quota_messages):
        assert ask(service, paid(service, box, b"m%d" % i), peer=os.urandom(4)).ok
    again = ask(service, paid(service, box, b"m0"), peer="again")
    assert again.ok  # the same envelope again is the same item, not a new one
    reply = ask(service, paid(service, box, b"one more"), peer="late")
    assert not reply.ok and reply.error == "the recipient's mailbox is full; try again later"
    _, other = register(service)
    big = ask(service, paid(service, other, b"x" * 6000))
    assert not big.ok and "full" in big.error


def test_rate_limit_per_depositor(service):
    _, box = register(service)
    _, box2 = register(service)
    replies = [
        ask(service, paid(service, box if i % 2 else box2, b"m"), peer="eager")
        for i in range(LIMITS.deposits_per_minute + 1)
    ]
    assert all(r.ok for r in replies[:-1])
    assert not replies[-1].ok and replies[-1].error.startswith("rate limit: at most 8 requests")
    assert ask(service, paid(service, box, b"m"), peer="someone else").ok


def test_unknown_mailbox_is_refused(service):
    reply = ask(service, paid(service, b"\1" * 16, b"m"))
    assert not reply.ok and reply.error == "no such mailbox here"
    challenge = ask(service, Request(Op.CHALLENGE, b"\1" * 16))
    assert not challenge.ok and challenge.error == "no such mailbox here"


def test_expired_envelopes_are_really_deleted(service, tmp_path: Path):
    key, box = register(service)
    ask(service, paid(service, box, b"short lived secret", ttl=10))
    store = service.store
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
    ask(service, paid(service, box, b"m", ttl=10**9))
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
    taken = [ask(service, take(service, box), peer=f"s{i}").prekey for i in range(7)]
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
    box = first.store.register(bytes(SigningKey(os.urandom(32)).verify_key), int(time.time()))
    identity = IdentityKeyPair.generate(os.urandom)
    prekey = OneTimePrekey.create(identity, 1, os.urandom)[0].encode()
    assert first.store.add_prekeys(box, (prekey,), int(time.time())) == 1
    second = MailboxService(MailboxStore(Database.open(home, "pw"), LIMITS), LIMITS)
    taking = take(first, box).encode()

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
        reply = service.answer(taking, name)
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


# -- what a stranger may ask, and what it costs (issue: hostile peers) ---------------


def test_registering_depositing_and_taking_prekeys_cost_a_token_or_work(service):
    key, box = register(service)
    public = bytes(key.verify_key)
    reply = ask(
        service, Request(Op.REGISTER, public_key=bytes(SigningKey(os.urandom(32)).verify_key))
    )
    assert not reply.ok and reply.error.startswith("registering needs proof of work")

    envelope = b"sealed"
    free = ask(service, Request(Op.DEPOSIT, box, envelope=envelope))
    assert not free.ok and free.error.startswith("a deposit without a token needs proof of work")
    # work pays for one envelope only (the tests' discounted work is a few
    # bits, so skip the nonces that happen to pay for this envelope too)
    bits = service.limits.work_bits(deposit_work_bits(len(envelope)))
    for_another = paid(service, box, b"another envelope")
    while work_done(Op.DEPOSIT, box, envelope, for_another.work, bits):
        for_another = paid(service, box, b"another envelope")
    stolen = Request(Op.DEPOSIT, box, envelope=envelope, work=for_another.work)
    assert not ask(service, stolen).ok
    assert ask(service, paid(service, box, envelope)).ok

    assert ask(service, Request(Op.DEPOSIT, box, envelope=b"by a contact", token=token_for(key))).ok
    expired = token_for(key, expires_at=int(time.time()) - 1)
    reply = ask(service, Request(Op.DEPOSIT, box, envelope=b"late", token=expired))
    assert not reply.ok and reply.error == "deposit token refused: the deposit token has expired"
    forged = token_for(SigningKey(os.urandom(32)))  # another owner's key
    reply = ask(service, Request(Op.DEPOSIT, box, envelope=b"forged", token=forged))
    assert not reply.ok and reply.error.startswith("deposit token refused")
    tampered = bytearray(token_for(key))
    tampered[-1] ^= 1
    reply = ask(service, Request(Op.DEPOSIT, box, envelope=b"x", token=bytes(tampered)))
    assert not reply.ok and reply.error == "deposit token refused"

    add_prekeys(service, key, box, 5)
    assert not ask(service, Request(Op.TAKE_PREKEY, box)).ok
    once = take(service, box)
    assert ask(service, once).prekey
    replay = ask(service, once, peer="another")
    assert not replay.ok and replay.error == "that proof of work was used already"
    stale = Request(Op.TAKE_PREKEY, box, work=once.work, window=once.window - 5)
    assert not ask(service, stale).ok
    assert ask(service, take(service, box, token=token_for(key))).prekey
    assert public  # the owner's key never had to be shown to a depositor


def test_strangers_cannot_crowd_out_an_owners_contacts(tmp_path: Path):
    limits = MailboxLimits(
        quota_messages=100,
        stranger_messages=3,
        token_messages=4,
        deposits_per_minute=1000,
        work_discount=LIMITS.work_discount,
    )
    service = MailboxService(
        MailboxStore(Database.create(tmp_path / "box", "pw", fast_kdf=True), limits), limits
    )
    key, box = register(service)
    for i in range(3):
        assert ask(service, paid(service, box, b"junk %d" % i)).ok
    crowded = ask(service, paid(service, box, b"junk 3"))
    assert (
        crowded.error
        == "the recipient's mailbox is full for deposits without a token; try again later"
    )
    alice, carol = token_for(key), token_for(key)
    for i in range(4):
        deposit = Request(Op.DEPOSIT, box, envelope=b"from alice %d" % i, token=alice)
        assert ask(service, deposit).ok
    over = ask(service, Request(Op.DEPOSIT, box, envelope=b"from alice 4", token=alice))
    assert over.error == "the recipient's mailbox is full for this deposit token; try again later"
    assert ask(service, Request(Op.DEPOSIT, box, envelope=b"from carol", token=carol)).ok


def test_strangers_fill_at_most_half_of_the_mailbox(tmp_path: Path):
    limits = MailboxLimits(
        max_bytes=20_000, deposits_per_minute=1000, work_discount=LIMITS.work_discount
    )
    service = MailboxService(
        MailboxStore(Database.create(tmp_path / "box", "pw", fast_kdf=True), limits), limits
    )
    owners = [register(service) for _ in range(3)]
    stored = 0
    for i in range(20):
        _, box = owners[i % 3]
        if ask(service, paid(service, box, os.urandom(1000))).ok:
            stored += 1000
    assert stored <= limits.max_bytes // 2
    key, box = owners[0]
    token = token_for(key)
    contact = [
        ask(service, Request(Op.DEPOSIT, box, envelope=os.urandom(1000), token=token))
        for _ in range(12)
    ]
    assert sum(r.ok for r in contact) >= 9  # the other half is the contacts'
    full = [r for r in contact if not r.ok]
    assert all(r.error == "this mailbox is full; try again later" for r in full)


def test_owners_are_capped_and_those_that_never_collect_expire(tmp_path: Path):
    limits = MailboxLimits(
        max_owners=3, owner_idle=10 * 24 * 3600, work_discount=LIMITS.work_discount
    )
    service = MailboxService(
        MailboxStore(Database.create(tmp_path / "box", "pw", fast_kdf=True), limits), limits
    )
    owners = [register(service) for _ in range(3)]
    bits = limits.work_bits(REGISTER_WORK_BITS)
    late = register_request(SigningKey(os.urandom(32)), bits)
    reply = ask(service, late)
    assert reply.error == "this mailbox takes no new owners; choose another"
    again = register_request(owners[0][0], bits)
    assert ask(service, again).ok  # registering again is not a new owner
    key, box = owners[0]
    ask(service, paid(service, box, b"for the one who collects"))
    ask(service, paid(service, owners[1][1], b"for one who never does"))
    later = int(time.time()) + limits.owner_idle - 100
    service.clock = lambda: later
    assert ask(service, proven(service, key, Op.FETCH, box)).ok  # owner 0 collects
    service.store.expire(later + 200)
    remaining = {bytes(r[0]) for r in service.store.db.all("SELECT mailbox_id FROM mailbox_owners")}
    assert remaining == {box}
    assert service.store.db.one("SELECT count(*) FROM mailbox_items")[0] == 1
    assert ask(service, late).ok  # room again


def test_a_challenge_flood_keeps_nothing_and_locks_no_one_out(service):
    key, box = register(service)
    ask(service, paid(service, box, b"for the owner"))
    for i in range(20_000):
        victim = ask(service, Request(Op.CHALLENGE, box), peer=i)
        assert victim.ok
        if i % 1000 == 0:
            nowhere = ask(service, Request(Op.CHALLENGE, os.urandom(16)), peer=i)
            assert nowhere.error == "no such mailbox here"
    assert len(service.challenges._spent) == 0  # challenges handed out are not remembered
    items = ask(service, proven(service, key, Op.FETCH, box)).items
    assert [i.envelope for i in items] == [b"for the owner"]
    # a challenge for one mailbox is no good for another, nor once it is old
    _, other = register(service)
    nonce = ask(service, Request(Op.CHALLENGE, other)).nonce
    signature = key.sign(proof_message(Op.FETCH, box, nonce)).signature
    assert not ask(service, Request(Op.FETCH, box, nonce=nonce, signature=signature)).ok
    old = ask(service, Request(Op.CHALLENGE, box)).nonce
    service.clock = lambda: time.time() + LIMITS.challenge_ttl + 10
    signature = key.sign(proof_message(Op.FETCH, box, old)).signature
    assert not ask(service, Request(Op.FETCH, box, nonce=old, signature=signature)).ok


def test_every_table_a_stranger_can_grow_is_bounded(service):
    from pigeon.node.mailbox_service import MAX_KEYS

    _, box = register(service)
    for i in range(MAX_KEYS + 500):
        ask(service, Request(Op.DEPOSIT, box, envelope=b"x"), peer=f"throwaway {i}")
        service.peers.allow(f"throwaway {i}", time.time())
    assert len(service.peers) <= MAX_KEYS
    assert len(service.tokens) == 0 and len(service.work) == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["stranger", "alice", "carol", "delete", "expire"]), max_size=30))
def test_counters_always_match_what_is_stored(tmp_path_factory, actions):
    limits = MailboxLimits(deposits_per_minute=10**6, work_discount=LIMITS.work_discount)
    db = Database.create(tmp_path_factory.mktemp("counters") / "box", "pw", fast_kdf=True)
    service = MailboxService(MailboxStore(db, limits), limits)
    key, box = register(service)
    tokens = {"alice": token_for(key), "carol": token_for(key)}
    now = time.time()
    for n, action in enumerate(actions):
        envelope = os.urandom(50 + n)
        if action == "stranger":
            ask(service, paid(service, box, envelope, ttl=5 * (n % 3 + 1)))
        elif action in tokens:
            ask(service, Request(Op.DEPOSIT, box, envelope=envelope, token=tokens[action], ttl_s=5))
        elif action == "delete":
            items = ask(service, proven(service, key, Op.FETCH, box)).items[:2]
            ask(service, proven(service, key, Op.DELETE, box, [i.item_id for i in items]))
        else:
            now += 6
            service.store.expire(int(now))
    owner = db.one("SELECT items, bytes FROM mailbox_owners WHERE mailbox_id = ?", (box,))
    actual = db.one(
        "SELECT count(*), coalesce(sum(size), 0) FROM mailbox_items WHERE mailbox_id = ?", (box,)
    )
    assert tuple(owner) == tuple(actual)
    usage = {
        bytes(r[0]): (r[1], r[2]) for r in db.all("SELECT source, items, bytes FROM mailbox_usage")
    }
    counted = {
        bytes(r[0]): (r[1], r[2])
        for r in db.all("SELECT source, count(*), sum(size) FROM mailbox_items GROUP BY source")
    }
    assert usage == counted
    db.close()


# -- deposits stored together, and what an operation costs as the mailbox fills -------


def fresh_store(tmp_path: Path, limits: MailboxLimits = LIMITS) -> MailboxStore:
    return MailboxStore(Database.create(tmp_path / "box", "pw", fast_kdf=True), limits)


def stored_envelopes(store: MailboxStore) -> list[bytes]:
    return [bytes(r[0]) for r in store.db.all("SELECT envelope FROM mailbox_items ORDER BY rowid")]


def counters(store: MailboxStore) -> tuple[object, ...]:
    db = store.db
    return (
        [tuple(r) for r in db.all("SELECT mailbox_id, items, bytes FROM mailbox_owners")],
        sorted(tuple(r) for r in db.all("SELECT * FROM mailbox_usage")),
    )


def test_a_refused_deposit_in_a_group_changes_nothing_for_the_others(tmp_path: Path):
    limits = MailboxLimits(quota_messages=5, token_messages=3)
    store = fresh_store(tmp_path, limits)
    now = int(time.time())
    box = store.register(os.urandom(32), now)
    a, b = b"a" * 16, b"b" * 16
    group = [
        Deposit(box, b"one", 0, now, a),
        Deposit(b"\1" * 16, b"nowhere", 0, now, a),
        Deposit(box, b"two", 0, now, a),
        Deposit(box, b"one", 0, now, b),  # the same envelope: the same item, counted once
        Deposit(box, b"three", 0, now, a),
        Deposit(box, b"four", 0, now, a),  # token a's share (3) is spent
        Deposit(box, b"five", 0, now, b),
        Deposit(box, b"six", 0, now, b),
        Deposit(box, b"seven", 0, now, b),  # the owner's quota (5) is reached
    ]
    results = store.deposit_many(group)
    errors = {i: str(r) for i, r in enumerate(results) if isinstance(r, MailboxRefused)}
    assert errors == {
        1: "no such mailbox here",
        5: "the recipient's mailbox is full for this deposit token; try again later",
        8: "the recipient's mailbox is full; try again later",
    }
    assert results[3] == results[0]
    assert stored_envelopes(store) == [b"one", b"two", b"three", b"five", b"six"]
    assert counters(store) == ([(box, 5, 18)], [(box, a, 3, 11), (box, b, 2, 7)])


def test_a_group_counts_the_mailboxs_totals_as_it_goes(tmp_path: Path):
    store = fresh_store(tmp_path, MailboxLimits(max_bytes=1000))
    now = int(time.time())
    a, b = store.register(os.urandom(32), now), store.register(os.urandom(32), now)
    token = b"t" * 16
    results = store.deposit_many(
        [
            Deposit(a, b"1" * 300, 0, now, STRANGERS),
            Deposit(b, b"2" * 300, 0, now, STRANGERS),  # strangers may fill half: 500
            Deposit(b, b"3" * 300, 0, now, token),
            Deposit(a, b"4" * 450, 0, now, token),  # the mailbox holds 1,000 at most
            Deposit(a, b"5" * 100, 0, now, token),
        ]
    )
    assert [str(r) for r in results if isinstance(r, MailboxRefused)] == [
        "this mailbox is full for deposits without a token; try again later",
        "this mailbox is full; try again later",
    ]
    assert stored_envelopes(store) == [b"1" * 300, b"3" * 300, b"5" * 100]


deposits = st.lists(
    st.tuples(
        st.sampled_from(["owner", "other", "nobody"]),
        st.sampled_from([b"", b"alice" * 3 + b"!", b"carol" * 3 + b"!"]),
        st.integers(1, 6),  # envelope: few of them, so copies come up
        st.sampled_from([10, 900, 2500]),  # sizes that reach the byte limits
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(deposits, st.integers(1, 8))
def test_a_group_stores_what_the_same_deposits_one_by_one_would(tmp_path_factory, wanted, size):
    """Whatever the mix (owners, sources, copies, refusals on every limit),
    storing deposits in groups gives the same answers, items and counters
    as storing them one at a time."""
    limits = MailboxLimits(
        quota_messages=8,
        quota_bytes=9000,
        token_messages=3,
        token_bytes=6000,
        stranger_messages=2,
        stranger_bytes=4000,
        max_bytes=14000,
    )
    keys = {"owner": os.urandom(32), "other": os.urandom(32), "nobody": os.urandom(32)}
    stores = [fresh_store(tmp_path_factory.mktemp("one"), limits) for _ in range(2)]
    now = int(time.time())
    for store in stores:
        store.register(keys["owner"], now)
        store.register(keys["other"], now)
    todo = [
        Deposit(mailbox_id(keys[who]), bytes([n]) * length, 0, now, source)
        for who, source, n, length in wanted
    ]
    alone, grouped = stores
    one_by_one = []
    for deposit in todo:
        try:
            one_by_one.append(alone.deposit(**deposit.__dict__))
        except MailboxRefused as refusal:
            one_by_one.append(refusal)
    together = []
    for first in range(0, len(todo), size):
        together += grouped.deposit_many(todo[first : first + size])

    def shown(results: list[bytes | MailboxRefused]) -> list[str]:
        # item IDs differ between the two stores; which ones are the same does not
        return [
            str(r) if isinstance(r, MailboxRefused) else f"item {results.index(r)}" for r in results
        ]

    assert shown(together) == shown(one_by_one)
    assert stored_envelopes(grouped) == stored_envelopes(alone)
    assert counters(grouped) == counters(alone)
    for store in stores:
        store.db.close()


class FailingDatabase(Database):
    """Raises on the ``fail_at``-th insert of an item from now on, as a full disk would."""

    fail_at: int | None = None

    def execute(self, sql, params=()):
        if self.fail_at is not None and sql.startswith("INSERT INTO mailbox_items"):
            self.fail_at -= 1
            if self.fail_at == 0:
                raise sqlcipher3.OperationalError("database or disk is full")
        return super().execute(sql, params)


def test_a_group_that_fails_stores_none_of_it_and_keeps_what_came_before(tmp_path: Path):
    db = FailingDatabase.create(tmp_path / "box", "pw", fast_kdf=True)
    store = MailboxStore(db, MailboxLimits())
    now = int(time.time())
    box = store.register(os.urandom(32), now)
    acknowledged = store.deposit_many([Deposit(box, b"kept %d" % i, 0, now, b"") for i in range(3)])
    db.fail_at = 3
    with pytest.raises(sqlcipher3.OperationalError):
        store.deposit_many([Deposit(box, b"lost %d" % i, 0, now, b"") for i in range(5)])
    db.close()
    store = MailboxStore(Database.open(tmp_path / "box", "pw"), MailboxLimits())  # restarted
    assert stored_envelopes(store) == [b"kept 0", b"kept 1", b"kept 2"]
    assert [bytes(r[0]) for r in store.db.all("SELECT id FROM mailbox_items ORDER BY rowid")] == (
        acknowledged
    )
    assert counters(store) == ([(box, 3, 18)], [(box, b"", 3, 18)])


class FakeStream:
    """An inbound stream that has ``data`` to read, then ends; what is
    written to it is handed to ``on_write``, frame by frame."""

    def __init__(self, data: bytes, peer: str, on_write=None, hang: bool = False) -> None:
        self.incoming = bytearray(data)
        self.hang = hang  # after the data, wait for more instead of ending
        self.frames: list[Response] = []
        self.on_write = on_write
        self.closed = False
        self.muxed_conn = type("Conn", (), {"peer_id": peer})()

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.incoming and self.hang:
            await trio.sleep_forever()
        chunk = bytes(self.incoming[:n])
        del self.incoming[:n]
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        data = bytes(data)
        while data:
            length, at = decode_varint(data, 0)
            response = Response.decode(data[at : at + length])
            data = data[at + length :]
            if self.on_write is not None:
                self.on_write(response)
            self.frames.append(response)

    async def close(self) -> None:
        self.closed = True

    async def reset(self) -> None:
        self.closed = True


def pipelined(requests: list[Request]) -> bytes:
    return b"".join(frame(request.encode()) for request in requests)


def token_service(tmp_path: Path) -> tuple[MailboxService, SigningKey, bytes]:
    limits = MailboxLimits(deposits_per_minute=60)  # the default
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    service = MailboxService(MailboxStore(db, limits), limits)
    key = SigningKey(os.urandom(32))
    box = service.store.register(bytes(key.verify_key), int(time.time()))
    return service, key, box


def test_a_deposit_is_acknowledged_only_once_committed_and_pipelined_ones_go_together(
    tmp_path: Path,
):
    """Five nodes pipeline 40 deposits each on a stream of their own.  Every
    acknowledgement written is checked on a second connection to the
    database, which sees only committed transactions; and the 200 deposits
    are stored in a few transactions, not one each."""
    service, key, box = token_service(tmp_path)
    committed = Database.open(tmp_path / "box", "pw")
    acknowledged: list[bytes] = []

    def on_write(response: Response) -> None:
        assert response.ok, response.error
        row = committed.one("SELECT 1 FROM mailbox_items WHERE id = ?", (response.item_id,))
        assert row is not None, "acknowledged before it was committed"
        acknowledged.append(response.item_id)

    streams = []
    for node in range(5):
        token = token_for(key)
        requests = [
            Request(Op.DEPOSIT, box, envelope=os.urandom(200), token=token) for _ in range(40)
        ]
        streams.append(FakeStream(pipelined(requests), f"node {node}", on_write))

    async def serve() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(service.handle, stream)

    trio.run(serve)
    assert len(set(acknowledged)) == 200 and all(s.closed for s in streams)
    assert service.stats["deposits"] == 200
    assert service.group.groups <= 20, f"{service.group.groups} transactions for 200 deposits"
    committed.close()


def test_requests_on_a_stream_are_answered_in_order_with_refusals_in_place(tmp_path: Path):
    service, key, box = token_service(tmp_path)
    token = token_for(key)
    requests = [
        Request(Op.DEPOSIT, box, envelope=b"first", token=token),
        Request(Op.DEPOSIT, box, envelope=b"unpaid"),
        Request(Op.CHALLENGE, box),
        Request(Op.DEPOSIT, box, envelope=b"first", token=token),  # a copy: the same item
        Request(Op.DEPOSIT, b"\1" * 16, envelope=b"lost", token=token),
        *[Request(Op.DEPOSIT, box, envelope=b"m%d" % i, token=token) for i in range(60)],
    ]
    stream = FakeStream(pipelined(requests), "node")
    trio.run(service.handle, stream)
    replies = stream.frames
    assert len(replies) == len(requests)
    assert replies[0].ok and replies[3].ok and replies[3].item_id == replies[0].item_id
    assert replies[1].error.startswith("a deposit without a token needs proof of work")
    assert replies[2].ok and replies[2].nonce
    assert replies[4].error == "no such mailbox here"
    # the default limit: 60 a minute per depositing peer and per token, the
    # first deposit and its copy among them
    assert all(r.ok for r in replies[5:63])
    assert all(r.error.startswith("rate limit") for r in replies[63:])
    assert stored_envelopes(service.store) == [b"first"] + [b"m%d" % i for i in range(58)]


def test_a_group_that_fails_acknowledges_none_of_it(tmp_path: Path):
    service, key, box = token_service(tmp_path)
    commit = service.store.deposit_group
    failures = [sqlcipher3.OperationalError("disk I/O error")]

    async def failing_once(group: list[Deposit]) -> list[bytes | MailboxRefused]:
        if failures:
            raise failures.pop()
        return await commit(group)

    service.group = GroupCommit(failing_once)
    token = token_for(key)
    first = FakeStream(
        pipelined([Request(Op.DEPOSIT, box, envelope=b"a%d" % i, token=token) for i in range(5)]),
        "first",
    )
    trio.run(service.handle, first)
    assert first.frames == [] and first.closed  # the stream ends without an answer
    assert stored_envelopes(service.store) == []
    then = FakeStream(pipelined([Request(Op.DEPOSIT, box, envelope=b"b", token=token)]), "then")
    trio.run(service.handle, then)
    assert [r.ok for r in then.frames] == [True]
    assert stored_envelopes(service.store) == [b"b"]


def test_a_group_is_committed_even_when_the_stream_that_started_it_goes(tmp_path: Path):
    """The first deposit of a group leads it; its stream being cancelled
    (the peer went) must not leave the others waiting, nor lose them."""
    service, key, box = token_service(tmp_path)
    leaving = FakeStream(
        pipelined([Request(Op.DEPOSIT, box, envelope=b"from the leaver", token=token_for(key))]),
        "leaver",
        hang=True,
    )
    staying = FakeStream(
        pipelined([Request(Op.DEPOSIT, box, envelope=b"stays", token=token_for(key))]), "stayer"
    )

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def leave() -> None:
                    with scope:
                        await service.handle(leaving)

                nursery.start_soon(leave)
                while not service.group._leading:
                    await trio.lowlevel.checkpoint()
                scope.cancel()  # while its deposit leads a group still gathering
                nursery.start_soon(service.handle, staying)

    trio.run(main)
    assert [r.ok for r in staying.frames] == [True]
    assert sorted(stored_envelopes(service.store)) == [b"from the leaver", b"stays"]


def test_every_operation_costs_the_same_however_much_the_mailbox_holds(tmp_path: Path):
    """SQLite's instructions for each operation (its progress handler counts
    them), with 10 items in the mailbox and with 3,000: no operation may
    read what the mailbox holds (a quota summed over the box, a lookup the
    planner answers by scanning an owner's items, an expiry sweep through
    the whole table)."""

    def costs(home: Path, held: int) -> dict[str, int]:
        store = fresh_store(home, MailboxLimits())
        db = store.db
        now = int(time.time())
        box = store.register(os.urandom(32), now)
        other = store.register(os.urandom(32), now)
        for owner in (box, other):
            store.deposit_many(
                [Deposit(owner, os.urandom(100), 0, now, bytes([i // 1000]) * 16) for i in held]
            )
        counted = [0]

        def step() -> int:
            counted[0] += 1
            return 0

        def cost(operation) -> int:
            counted[0] = 0
            db._db.set_progress_handler(step, 10)
            try:
                operation()
            finally:
                db._db.set_progress_handler(None, 10)
            return counted[0]

        new = [Deposit(box, os.urandom(100), 5, now, b"t" * 16) for _ in range(10)]
        page: list[Item] = []
        result = {
            "deposit": cost(lambda: store.deposit_many(new)),
            "copy": cost(lambda: store.deposit_many(new[:1])),
            "fetch": cost(lambda: page.extend(store.fetch(box, 10)[0])),
            "delete": cost(lambda: store.delete(box, tuple(i.item_id for i in page))),
            "expire nothing": cost(lambda: store.expire(now + 1)),
            "expire": cost(lambda: store.expire(now + 6)),
        }
        db.close()
        return result

    few, many = costs(tmp_path / "few", range(10)), costs(tmp_path / "many", range(3000))
    assert all(many[op] <= few[op] * 1.5 + 10 for op in few), (few, many)


# -- an owner's collection, against a mailbox in this process --------------------------


class InProcessMailbox:
    """What an owner's MailboxStream does, answered by a MailboxService here."""

    def __init__(self, service: MailboxService) -> None:
        self.service = service
        self.calls: list[list[Op]] = []

    async def call(self, requests: list[Request]) -> list[Response]:
        self.calls.append([request.op for request in requests])
        await trio.lowlevel.checkpoint()
        return [ask(self.service, request, peer="owner") for request in requests]


def collecting(tmp_path: Path, clock: list[float]) -> tuple[MailboxService, object, list[bytes]]:
    """A mailbox holding 600 envelopes for an owner whose node stores what
    it collects in ``accepted`` (and lets ``clock[1]`` seconds pass on the
    mailbox's clock while it does)."""
    limits = MailboxLimits(deposits_per_minute=10**6)
    db = Database.create(tmp_path / "box", "pw", fast_kdf=True)
    service = MailboxService(MailboxStore(db, limits), limits, clock=lambda: clock[0])
    accepted: list[bytes] = []

    def accept(envelopes: list[bytes], peer: object) -> list[AckStatus]:
        accepted.extend(envelopes)
        clock[0] += clock[1]
        return [AckStatus.STORED] * len(envelopes)

    owner = MailboxOwner(
        Database.create(tmp_path / "owner", "pw", fast_kdf=True),
        None,  # host, DHT and prekeys: no network here
        None,
        None,
        accept,
        lambda: None,
        count=1,
        interval=30,
        random=os.urandom,
        clock=lambda: clock[0],
    )
    box = service.store.register(bytes(owner.mailbox_key.verify_key), int(clock[0]))
    assert box == owner.mailbox_id
    now = int(clock[0])
    service.store.deposit_many([Deposit(box, b"e%04d" % i, 0, now, b"t" * 16) for i in range(600)])
    return service, owner, accepted


def test_an_owner_collects_a_page_per_call_deleting_each_before_the_next(tmp_path: Path):
    clock = [time.time(), 0.0]
    service, owner, accepted = collecting(tmp_path, clock)
    mailbox = InProcessMailbox(service)
    info = PeerInfo(ID(os.urandom(34)), [])
    collected, drained = trio.run(owner._collect_on, mailbox, info)
    assert (collected, drained) == (600, True)
    assert accepted == [b"e%04d" % i for i in range(600)]  # once each, in order
    assert service.store.fetch(owner.mailbox_id, 10) == ([], False)
    C, F, D = Op.CHALLENGE, Op.FETCH, Op.DELETE
    # pages of 256, 256 and 88: each deleted on the call that fetches the next
    assert mailbox.calls == [[C, C], [F, C, C], [D, F, C, C], [D, F, C, C], [D]]


def test_a_challenge_held_too_long_is_asked_for_again(tmp_path: Path):
    """The challenges for the next call are asked for on the call before;
    if storing a page took longer than they live (the node slept), the
    mailbox refuses the proofs, and the owner proves again over fresh ones
    instead of counting it as a mailbox's failure."""
    clock = [time.time(), 0.0]
    service, owner, accepted = collecting(tmp_path, clock)
    clock[1] = LIMITS.challenge_ttl + 30  # storing a page takes that long
    info = PeerInfo(ID(os.urandom(34)), [])
    collected, drained = trio.run(owner._collect_on, InProcessMailbox(service), info)
    assert (collected, drained) == (600, True)
    assert accepted == [b"e%04d" % i for i in range(600)]
    assert service.store.fetch(owner.mailbox_id, 10) == ([], False)
