"""Our own mailboxes, as a recipient: keep k of them registered, collect
from them (at start-up, on an interval, on reconnect, when one sends a
notice), replace one that keeps failing, and keep each stocked with one-time
prekeys.  See docs/protocol/mailbox.md.

Collection is paged (a FETCH reply is at most one page) and resumable: each
page is committed, then deleted at the mailbox, so a failure midway loses
nothing and the next collection starts where this one stopped.  A mailbox
that refuses a DELETE or serves an item again counts as failing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey

from pigeon.protocol import PigeonError, Random
from pigeon.protocol.frames import MAX_NOTICE_FRAME, AckStatus, MailboxNotice
from pigeon.protocol.mailbox import (
    REGISTER_WORK_BITS,
    TOKEN_ID_SIZE,
    DepositToken,
    Op,
    Request,
    Response,
    mailbox_id,
    proof_message,
    work_done,
)

from .framing import StreamClosed, read_frame
from .mailbox import MAILBOX_PROTOCOL, PROVIDER_KEY, MailboxStream, call, mailbox_peer
from .prekeys import Prekeys
from .routing import find_providers, known_serving
from .storage import Database
from .work import prove

log = logging.getLogger("pigeon.mailbox")

PREKEY_REFILL_BELOW = 10  # as Signal: refill below 10, in batches of 100
PREKEY_BATCH = 100
# A mailbox is replaced after this many failed collections in a row; one that
# cannot be reached, only once that has lasted MAILBOX_FAIL_INTERVALS
# collection intervals (10 minutes at the default 30 s): a partition or a
# restart of a few minutes does not cost a mailbox.
MAILBOX_MAX_FAILURES = 3
MAILBOX_FAIL_INTERVALS = 20
# A replaced mailbox is retired: no longer in our record, but still collected
# from until it has been drained after senders had time to see the record
# without it (RETIRED_DRAIN_AFTER), or until what it holds has expired there.
RETIRED_DRAIN_AFTER = 3600
RETIRED_KEEP = 30 * 24 * 3600  # a mailbox's longest envelope lifetime
MAX_COLLECT_PAGES = 64  # pages per mailbox per collection; the rest comes right after
# Private halves of one-time prekeys left with one mailbox and not yet used:
# beyond this, a mailbox is not refilled (they expire after PREKEY_LIFETIME).
MAX_OUTSTANDING_PREKEYS = 3 * PREKEY_BATCH
TOKEN_LIFETIME = 30 * 24 * 3600  # a deposit token we give a contact
SHUN_FOR = 3600.0  # seconds a mailbox we dropped for failing is not chosen again
MAX_SHUNNED = 256
# While we hold fewer mailboxes than we want, we search for more (a DHT lookup
# and requests to the peers closest to the providers' key).  Holding none, soon
# (SEARCH_FIRST) and then twice as long after each search that gave us none,
# up to SEARCH_MAX_NONE; holding some, after SEARCH_AGAIN and then twice as
# long each time, up to SEARCH_MAX: a network with fewer mailbox peers than we
# want is searched twice an hour, not every 30 s.  Each wait is shortened by up
# to SEARCH_JITTER of it at random, so that nodes started together do not
# search together.  A search that gave us one, or a mailbox lost, starts the
# schedule again.  Holding enough, we do not search.
SEARCH_FIRST = 5.0
SEARCH_MAX_NONE = 5 * 60.0
SEARCH_AGAIN = 10.0  # soon enough for a new node to hold all it wants within a minute
SEARCH_MAX = 30 * 60.0
SEARCH_JITTER = 0.25


def search_delay(searches: int, have: int, jitter: float) -> float:
    """Seconds until the next search for mailboxes, after ``searches`` in a
    row that gave us none, holding ``have``; ``jitter`` from 0 to 1."""
    first, cap = (SEARCH_AGAIN, SEARCH_MAX) if have else (SEARCH_FIRST, SEARCH_MAX_NONE)
    delay = min(cap, first * 2.0 ** min(max(searches - 1, 0), 32))
    return delay * (1 - SEARCH_JITTER * jitter)


Accept = Callable[[list[bytes], object], list[AckStatus]]


class MailboxFailure(PigeonError):
    """A mailbox did not do what the protocol asks of it."""


class MailboxOwner:
    def __init__(
        self,
        db: Database,
        host: IHost,
        dht: KadDHT,
        prekeys: Prekeys,
        accept: Accept,
        republish: Callable[[], None],
        *,
        count: int,
        interval: float,
        random: Random,
        clock: Callable[[], float],
    ) -> None:
        self.db = db
        self.host = host
        self.dht = dht
        self.prekeys = prekeys
        self.accept = accept
        self.republish = republish
        self.count = count
        self.interval = interval
        self.random = random
        self.clock = clock
        self.collect_now = trio.Event()
        self._searches = 0  # searches in a row that gave us no mailbox
        self._search_at = -math.inf  # trio time of the next search, while we hold too few
        self._had = 0  # mailboxes held at the last search
        self._key: SigningKey | None = None
        self._shunned: dict[bytes, float] = {}  # peer ID -> until (trio time)

    @property
    def mailbox_key(self) -> SigningKey:
        """Our mailbox key: not the identity key, so a mailbox never holds
        anything that can sign as us."""
        if self._key is None:
            seed = self.db.get_meta("mailbox_seed")
            if seed is None:
                seed = self.random(32)
                with self.db.transaction():
                    self.db.set_meta("mailbox_seed", seed)
            self._key = SigningKey(seed)
        return self._key

    @property
    def mailbox_id(self) -> bytes:
        return mailbox_id(bytes(self.mailbox_key.verify_key))

    def issue_token(self) -> bytes:
        """A deposit token for a contact, valid at all our mailboxes for 30 days."""
        key = self.mailbox_key
        token = DepositToken.issue(
            bytes(key.verify_key),
            lambda statement: key.sign(statement).signature,
            self.random(TOKEN_ID_SIZE),
            int(self.clock()) + TOKEN_LIFETIME,
        )
        return token.encode()

    def my_mailboxes(self, retired: bool = False) -> list[tuple[bytes, list[str]]]:
        """The mailboxes in use (in our record); with ``retired``, also those
        we stopped using and still collect from."""
        where = "" if retired else " WHERE retired_at IS NULL"
        return [
            (bytes(r[0]), [str(a) for a in json.loads(r[1])])
            for r in self.db.all(
                f"SELECT peer_id, addresses FROM my_mailboxes{where} ORDER BY registered_at"
            )
        ]

    def is_mailbox(self, peer: ID) -> bool:
        return peer.to_bytes() in {p for p, _ in self.my_mailboxes(retired=True)}

    async def run(self) -> None:
        """Keep k mailboxes registered and collect from them: at start-up, on
        every interval, and when asked."""
        while True:
            try:
                if await self._search():
                    self.republish()
                await self.collect_mailboxes()
            except Exception as error:
                log.warning("mailbox upkeep failed: %s", error)
            self.prekeys.expire_one_time()
            wait = self.interval
            if len(self.my_mailboxes()) < self.count:
                wait = max(0.0, min(wait, self._search_at - trio.current_time()))
            with trio.move_on_after(wait):
                await self.collect_now.wait()
            self.collect_now = trio.Event()

    async def _search(self) -> bool:
        """Search for mailboxes when we hold fewer than we want and the
        schedule (``search_delay``) says it is time; whether we registered
        with one."""
        have = len(self.my_mailboxes())
        if have >= self.count or have < self._had:
            self._searches, self._search_at = 0, -math.inf
        self._had = have
        if have >= self.count or trio.current_time() < self._search_at:
            return False
        found = False
        try:
            found = await self._ensure_mailboxes()
        finally:
            self._searches = 0 if found else self._searches + 1
            self._had = len(self.my_mailboxes())
            jitter = int.from_bytes(self.random(2), "big") / 65536
            delay = search_delay(self._searches, self._had, jitter)
            self._search_at = trio.current_time() + delay
        return found

    async def _ensure_mailboxes(self) -> bool:
        have = {peer for peer, _ in self.my_mailboxes()}
        if len(have) >= self.count:
            return False
        now = trio.current_time()
        self._shunned = {p: t for p, t in self._shunned.items() if t > now}
        # Mailbox peers we know of already (identify said what they serve:
        # often our bootstrap peers), at no cost; then a search.
        changed = await self._register_with(known_serving(self.host, MAILBOX_PROTOCOL), have)
        if len(have) >= self.count:
            return changed
        # From the peers closest to the key, not a copy we kept: a mailbox
        # that started since our last search is found too.  The search has a
        # time limit of its own (``find_providers``); registering does not
        # count against it, so a proof of work queued behind others (the nodes
        # of a simulation share one worker) does not cut a search short.
        enough = self.count + len(self._shunned) + 1
        providers = await find_providers(self.dht, bytes.fromhex(PROVIDER_KEY), enough)
        return await self._register_with(providers, have) or changed

    async def _register_with(self, candidates: list[PeerInfo], have: set[bytes]) -> bool:
        """Register with candidates in turn until we hold enough; whether
        we registered with any (``have`` grows with each)."""
        changed = False
        for info in candidates:
            raw = info.peer_id.to_bytes()
            if raw in have or raw in self._shunned or info.peer_id == self.host.get_id():
                continue
            if len(have) >= self.count:
                break
            if await self._register(info):
                have.add(raw)
                changed = True
        return changed

    async def _register_work(self) -> bytes:
        """Our proof of work for REGISTER.  It binds only our mailbox key (a
        mailbox checks the work against the key it registers, and keeps no
        record of it), so it is done once for the key and kept: registering
        with a second mailbox, or again after one forgot us, costs no more work."""
        public_key = bytes(self.mailbox_key.verify_key)
        work = self.db.get_meta("mailbox_register_work")
        if work is None or not work_done(
            Op.REGISTER, self.mailbox_id, public_key, work, REGISTER_WORK_BITS
        ):
            start = int.from_bytes(self.random(6), "big")
            work = await prove(Op.REGISTER, self.mailbox_id, public_key, REGISTER_WORK_BITS, start)
            with self.db.transaction():
                self.db.set_meta("mailbox_register_work", work)
        return work

    async def _register(self, info: PeerInfo) -> bool:
        public_key = bytes(self.mailbox_key.verify_key)
        work = await self._register_work()
        request = Request(Op.REGISTER, public_key=public_key, work=work)
        try:
            (reply,) = await call(self.host, info, [request])
        except Exception as error:
            log.info("mailbox %s did not answer: %s", info.peer_id, error)
            return False
        if not reply.ok:
            log.info("mailbox %s refused us: %s", info.peer_id, reply.error)
            return False
        addresses = [f"{a}/p2p/{info.peer_id}" for a in info.addrs]
        with self.db.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO my_mailboxes (peer_id, addresses, registered_at)"
                " VALUES (?, ?, ?)",
                (info.peer_id.to_bytes(), json.dumps(addresses), int(self.clock())),
            )
        log.info("registered with mailbox %s", info.peer_id)
        return True

    async def collect_mailboxes(self) -> int:
        """Fetch, store and then delete what our mailboxes hold for us."""
        total = 0
        for peer_raw, addresses in self.my_mailboxes(retired=True):
            info = mailbox_peer(peer_raw, addresses)
            try:
                collected, drained = await self._collect_from(info)
                total += collected
                self._collected(peer_raw, drained)
            except Exception as error:
                log.info("collecting from mailbox %s failed: %s", info.peer_id, error)
                self._failed(peer_raw, info, misbehaved=isinstance(error, MailboxFailure))
        return total

    def _collected(self, peer_raw: bytes, drained: bool) -> None:
        now = int(self.clock())
        with self.db.transaction():
            self.db.execute(
                "UPDATE my_mailboxes SET failures = 0, failing_since = NULL WHERE peer_id = ?",
                (peer_raw,),
            )
            if drained:
                # A retired mailbox is let go once senders have had time to see
                # our record without it and it holds nothing more for us.
                self.db.execute(
                    "DELETE FROM my_mailboxes WHERE peer_id = ? AND retired_at <= ?",
                    (peer_raw, now - RETIRED_DRAIN_AFTER),
                )

    def _failed(self, peer_raw: bytes, info: PeerInfo, misbehaved: bool) -> None:
        """A collection failed.  A mailbox that answers against the protocol is
        dropped after three failures in a row (what it holds it does not give
        us anyway); one that cannot be reached is retired only after failing
        for MAILBOX_FAIL_INTERVALS intervals, and still collected from after."""
        now = int(self.clock())
        with self.db.transaction():
            self.db.execute(
                "UPDATE my_mailboxes SET failures = failures + 1,"
                " failing_since = coalesce(failing_since, ?) WHERE peer_id = ?",
                (now, peer_raw),
            )
            row = self.db.one(
                "SELECT failures, failing_since, retired_at FROM my_mailboxes WHERE peer_id = ?",
                (peer_raw,),
            )
            if row is None:
                return
            failures, failing_since, retired_at = row
            if retired_at is not None:
                if retired_at <= now - RETIRED_KEEP:  # all it held has expired there
                    self.db.execute("DELETE FROM my_mailboxes WHERE peer_id = ?", (peer_raw,))
                return
            if failures < MAILBOX_MAX_FAILURES:
                return
            if misbehaved:
                log.warning("mailbox %s keeps failing: replacing it", info.peer_id)
                self.db.execute("DELETE FROM my_mailboxes WHERE peer_id = ?", (peer_raw,))
            elif failing_since <= now - MAILBOX_FAIL_INTERVALS * self.interval:
                log.warning(
                    "mailbox %s keeps failing: replacing it (what it holds for us is still"
                    " collected if it comes back)",
                    info.peer_id,
                )
                self.db.execute(
                    "UPDATE my_mailboxes SET retired_at = ? WHERE peer_id = ?", (now, peer_raw)
                )
            else:
                return
            if len(self._shunned) < MAX_SHUNNED:
                self._shunned[peer_raw] = trio.current_time() + SHUN_FOR
            self.republish()  # senders must stop depositing there
            self.collect_now.set()

    async def _proven(self, info: PeerInfo, op: Op, items: tuple[bytes, ...] = ()) -> Response:
        """An owner-only request, signed over a fresh challenge."""
        box = self.mailbox_id
        (challenge,) = await call(self.host, info, [Request(Op.CHALLENGE, box)])
        if not challenge.ok or not challenge.nonce:
            raise MailboxFailure(f"mailbox gave no challenge: {challenge.error}")
        signature = self.mailbox_key.sign(proof_message(op, box, challenge.nonce, items)).signature
        request = Request(op, box, nonce=challenge.nonce, signature=signature)
        if op == Op.ADD_PREKEYS:
            request = Request(op, box, nonce=challenge.nonce, signature=signature, prekeys=items)
        elif op == Op.DELETE:
            request = Request(op, box, nonce=challenge.nonce, signature=signature, item_ids=items)
        (reply,) = await call(self.host, info, [request])
        return reply

    async def _collect_from(self, info: PeerInfo) -> tuple[int, bool]:
        """(envelopes stored, whether the mailbox has nothing more for us)."""
        mailbox = MailboxStream(self.host, info)
        try:
            return await self._collect_on(mailbox, info)
        finally:
            await mailbox.close()

    async def _collect_on(self, mailbox: MailboxStream, info: PeerInfo) -> tuple[int, bool]:
        collected = 0
        seen: set[bytes] = set()
        nonces: list[bytes] = []  # the mailbox's challenges, asked for ahead
        stored: tuple[bytes, ...] = ()  # committed here, not yet deleted there
        for _ in range(MAX_COLLECT_PAGES):
            # each page is committed before it is deleted at the mailbox: a
            # crash in between gives duplicates, which are dropped, never loss
            fetched = await self._delete_and_fetch(mailbox, stored, nonces)
            ids = tuple(item.item_id for item in fetched.items)
            if len(set(ids)) != len(ids) or seen.intersection(ids):
                raise MailboxFailure("mailbox served an item again after we deleted it")
            seen.update(ids)
            stored = ()
            if ids:
                statuses = self.accept([item.envelope for item in fetched.items], info.peer_id)
                collected += statuses.count(AckStatus.STORED)
                stored = ids
            if not fetched.more:
                await self._delete_and_fetch(mailbox, stored, nonces, fetch=False)
                await self._refill_prekeys(info, fetched.prekeys_left)
                return collected, True
        await self._delete_and_fetch(mailbox, stored, nonces, fetch=False)
        self.collect_now.set()  # more is waiting: go on at once, after the other mailboxes
        return collected, False

    async def _delete_and_fetch(
        self,
        mailbox: MailboxStream,
        stored: tuple[bytes, ...],
        nonces: list[bytes],
        *,
        fetch: bool = True,
        again: bool = True,
    ) -> Response:
        """Delete ``stored`` at the mailbox (when any), then fetch the next
        page: one stream, the requests in that order (a mailbox answers a
        stream's requests in order), each signed over a challenge asked for
        on the stream before, which also asks for the next two.  A proof
        refused because we held its challenge too long (the node slept, say)
        is made again over fresh ones, once.  The FETCH reply (an empty one
        without ``fetch``)."""
        if not stored and not fetch:
            return Response(ok=True)
        box = self.mailbox_id
        if len(nonces) < 2:
            replies = await mailbox.call([Request(Op.CHALLENGE, box)] * 2)
            nonces[:] = [r.nonce for r in replies if r.ok and r.nonce]
            if len(nonces) < 2:
                raise MailboxFailure(f"mailbox gave no challenge: {replies[0].error}")
        requests = []
        if stored:
            requests.append(self._signed(Op.DELETE, nonces.pop(), stored))
        if fetch:
            requests += [self._signed(Op.FETCH, nonces.pop())]
            requests += [Request(Op.CHALLENGE, box)] * 2
        replies = await mailbox.call(requests)
        nonces[:] = [r.nonce for r in replies[len(requests) - 2 :] if fetch and r.ok and r.nonce]
        if stored:
            deleted, replies = replies[0], replies[1:]
            if not deleted.ok:
                if deleted.error == "proof refused" and again:
                    # what was fetched after it is what we did not delete: ask again
                    return await self._delete_and_fetch(
                        mailbox, stored, [], fetch=fetch, again=False
                    )
                raise MailboxFailure(f"mailbox refused to delete: {deleted.error}")
        if not fetch:
            return Response(ok=True)
        fetched = replies[0]
        if not fetched.ok:
            if fetched.error == "proof refused" and again:
                return await self._delete_and_fetch(mailbox, (), [], again=False)
            raise MailboxFailure(f"mailbox refused our pickup: {fetched.error}")
        return fetched

    def _signed(self, op: Op, nonce: bytes, items: tuple[bytes, ...] = ()) -> Request:
        box = self.mailbox_id
        signature = self.mailbox_key.sign(proof_message(op, box, nonce, items)).signature
        return Request(op, box, nonce=nonce, signature=signature, item_ids=items)

    async def _refill_prekeys(self, info: PeerInfo, left: int) -> None:
        mailbox = info.peer_id.to_bytes()
        if left >= PREKEY_REFILL_BELOW or not any(p == mailbox for p, _ in self.my_mailboxes()):
            return  # enough, or a retired mailbox: senders no longer take prekeys there
        if self.prekeys.outstanding(mailbox) >= MAX_OUTSTANDING_PREKEYS:
            # Handed out faster than sessions start with them: someone is
            # draining them.  Senders fall back to three-DH X3DH meanwhile.
            log.warning("one-time prekeys at mailbox %s drain too fast: not refilled", info.peer_id)
            return
        prekeys = self.prekeys.new_one_time(PREKEY_BATCH, mailbox)
        reply = await self._proven(info, Op.ADD_PREKEYS, tuple(p.encode() for p in prekeys))
        if reply.ok:
            log.info("left %d one-time prekeys with mailbox %s", len(prekeys), info.peer_id)

    async def handle_notice(self, stream: INetStream) -> None:
        """A mailbox says something arrived for us: collect now."""
        peer = stream.muxed_conn.peer_id
        try:
            notice = MailboxNotice.decode(await read_frame(stream, MAX_NOTICE_FRAME, timeout=5))
            if notice.mailbox_id == self.mailbox_id and self.is_mailbox(peer):
                self.collect_now.set()
        except StreamClosed:
            log.debug("peer=%s closed a mailbox notice stream before the notice", peer)
        except trio.TooSlowError:
            log.info("peer=%s sent no mailbox notice in time, closed", peer)
        except Exception as error:
            log.info("peer=%s sent a bad mailbox notice: %s", peer, type(error).__name__)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
