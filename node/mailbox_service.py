"""The mailbox protocol handler (``/pigeon/mailbox/1.0.0``, docs/protocol/mailbox.md):
one request, one response, per frame.

Nothing a stranger sends grows without bound here.  Challenges are stateless
(the nonce carries its time and a MAC; only nonces spent in a valid owner's
proof are remembered, until they would have expired anyway).  Registering,
depositing and taking a prekey are paid for: with the owner's deposit token,
or with proof of work.  Every per-key table is bounded or expires.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import struct
import time
from collections.abc import Callable

from libp2p.abc import INetStream

from pigeon.protocol import DecryptError, ProtocolError, Random
from pigeon.protocol.keys import verify_signature
from pigeon.protocol.mailbox import (
    MAX_ITEMS,
    MAX_REQUEST_SIZE,
    NONCE_SIZE,
    REGISTER_WORK_BITS,
    TAKE_PREKEY_WORK_BITS,
    DepositToken,
    Op,
    Request,
    Response,
    deposit_work_bits,
    mailbox_id,
    proof_message,
    work_done,
)

from .framing import serve_frames
from .mailbox_store import STRANGERS, MailboxLimits, MailboxRefused, MailboxStore

log = logging.getLogger("pigeon.mailbox")

MAX_KEYS = 10_000  # peers or tokens a rate limiter remembers at once
MAX_SPENT = 100_000  # spent nonces and proofs of work remembered at once
_TIME = struct.Struct(">Q")


class RateLimiter:
    """At most ``per_minute`` events per key in any minute.  It remembers at
    most MAX_KEYS keys, the least recently active forgotten first: a
    forgotten key gains nothing that a fresh identity would not have."""

    def __init__(self, per_minute: int, max_keys: int = MAX_KEYS) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._events: collections.OrderedDict[object, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def allow(self, key: object, now: float) -> bool:
        window = self._events.pop(key, None) or collections.deque()
        while window and window[0] <= now - 60:
            window.popleft()
        allowed = len(window) < self.per_minute
        if allowed:
            window.append(now)
        if window:
            self._events[key] = window
            while len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._events)


class Spent:
    """Things that may be used once within a time window (a challenge, a proof
    of work), remembered until the window has passed, at most MAX_SPENT."""

    def __init__(self, max_entries: int = MAX_SPENT) -> None:
        self.max_entries = max_entries
        self._until: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def first_use(self, key: bytes, now: float, until: float) -> bool:
        while self._until and next(iter(self._until.values())) <= now:
            self._until.popitem(last=False)
        if key in self._until:
            return False
        self._until[key] = until
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._until)


class Challenges:
    """Single-use challenges that cost nothing to hand out: the nonce is the
    time it was made, random bytes, and a MAC under this process's secret."""

    def __init__(self, secret: bytes, ttl: float) -> None:
        self._secret = secret
        self.ttl = ttl
        self._spent = Spent()

    def _tag(self, box: bytes, made: bytes, rand: bytes) -> bytes:
        return hmac.new(self._secret, box + made + rand, hashlib.sha256).digest()[:16]

    def issue(self, box: bytes, now: float, random: Random) -> bytes:
        made = _TIME.pack(int(now))
        rand = random(NONCE_SIZE - 8 - 16)
        return made + rand + self._tag(box, made, rand)

    def valid(self, box: bytes, nonce: bytes, now: float) -> bool:
        if len(nonce) != NONCE_SIZE:
            return False
        made, rand, tag = nonce[:8], nonce[8:16], nonce[16:]
        if not hmac.compare_digest(tag, self._tag(box, made, rand)):
            return False
        made_at: int = _TIME.unpack(made)[0]
        return -5 <= now - made_at <= self.ttl

    def spend(self, nonce: bytes, now: float) -> bool:
        """Mark a nonce used in a valid proof; False if it was used before."""
        return self._spent.first_use(nonce, now, now + self.ttl + 5)


class MailboxService:
    def __init__(
        self,
        store: MailboxStore,
        limits: MailboxLimits,
        clock: Callable[[], float] = time.time,
        random: Random = os.urandom,
    ) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self.random = random
        self.challenges = Challenges(random(32), limits.challenge_ttl)
        self.peers = RateLimiter(limits.deposits_per_minute)
        self.tokens = RateLimiter(limits.deposits_per_minute)
        self.work = Spent()
        # mailbox -> the peer that last proved it owns it: told when something
        # arrives.  Bounded by the owners, which are bounded.
        self.owners_seen: dict[bytes, object] = {}
        self.on_deposit: Callable[[bytes, object], None] | None = None
        self.stats = {"deposits": 0, "refused": 0, "fetched": 0}

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        await serve_frames(
            stream, MAX_REQUEST_SIZE, lambda data: self.answer(data, peer).encode(), "mailbox"
        )

    def answer(self, data: bytes, peer: object) -> Response:
        try:
            request = Request.decode(data)
            return self._answer(request, peer)
        except MailboxRefused as error:
            self.stats["refused"] += 1
            log.info("peer=%s mailbox request refused: %s", peer, error)
            return Response(ok=False, error=str(error))
        except DecryptError:
            self.stats["refused"] += 1
            log.info("peer=%s mailbox proof refused", peer)
            return Response(ok=False, error="proof refused")

    def _answer(self, request: Request, peer: object) -> Response:
        now = self.clock()
        op = request.op
        if op == Op.REGISTER:
            box = mailbox_id(request.public_key)
            bits = self.limits.work_bits(REGISTER_WORK_BITS)
            if not work_done(op, box, request.public_key, request.work, bits):
                raise MailboxRefused(f"registering needs proof of work ({bits} bits)")
            return Response(ok=True, item_id=self.store.register(request.public_key, int(now)))
        box = request.mailbox_id
        owner_key = self.store.owner_key(box)
        if owner_key is None:
            raise MailboxRefused("no such mailbox here")
        if op == Op.CHALLENGE:
            return Response(ok=True, nonce=self.challenges.issue(box, now, self.random))
        if op in (Op.DEPOSIT, Op.TAKE_PREKEY):
            source = self._paid(request, owner_key, now)
            if not self.peers.allow(peer, now):
                raise MailboxRefused(
                    f"rate limit: at most {self.limits.deposits_per_minute} requests a minute;"
                    " retry later"
                )
            if op == Op.TAKE_PREKEY:
                return Response(ok=True, prekey=self.store.take_prekey(box, int(now)))
            item_id = self.store.deposit(box, request.envelope, request.ttl_s, int(now), source)
            self.stats["deposits"] += 1
            owner = self.owners_seen.get(box)
            if owner is not None and self.on_deposit is not None:
                self.on_deposit(box, owner)
            return Response(ok=True, item_id=item_id)
        # the owner's operations: its mailbox key's signature over a fresh challenge
        self._check_proof(request, owner_key, now)
        self.store.proven(box, int(now))
        self.owners_seen[box] = peer
        if op == Op.FETCH:
            items, more = self.store.fetch(box, request.limit or MAX_ITEMS)
            self.stats["fetched"] += len(items)
            return Response(
                ok=True, items=tuple(items), prekeys_left=self.store.prekeys_left(box), more=more
            )
        if op == Op.ADD_PREKEYS:
            left = self.store.add_prekeys(box, request.prekeys, int(now))
            return Response(ok=True, prekeys_left=left)
        self.store.delete(box, request.item_ids)
        return Response(ok=True)

    def _paid(self, request: Request, owner_key: bytes, now: float) -> bytes:
        """The source a deposit or prekey take counts against: the deposit
        token it carries, or strangers' work; refused when it has neither."""
        box = request.mailbox_id
        if request.token:
            try:
                token = DepositToken.decode(request.token)
                token.verify(owner_key, int(now))
            except DecryptError:
                raise MailboxRefused("deposit token refused") from None
            except ProtocolError as error:
                raise MailboxRefused(f"deposit token refused: {error}") from None
            if not self.tokens.allow(token.token_id, now):
                raise MailboxRefused(
                    f"rate limit: at most {self.limits.deposits_per_minute} requests a minute"
                    " with one deposit token; retry later"
                )
            return token.token_id
        if request.op == Op.DEPOSIT:
            bits = self.limits.work_bits(deposit_work_bits(len(request.envelope)))
            if not work_done(request.op, box, request.envelope, request.work, bits):
                raise MailboxRefused(f"a deposit without a token needs proof of work ({bits} bits)")
            return STRANGERS
        bits = self.limits.work_bits(TAKE_PREKEY_WORK_BITS)
        if not request.work:
            raise MailboxRefused(
                f"taking a prekey without a token needs proof of work ({bits} bits)"
            )
        minute = int(now // 60)
        if abs(request.window - minute) > 1:
            raise MailboxRefused("the proof of work is for another minute; do it again")
        subject = _TIME.pack(request.window)
        if not work_done(request.op, box, subject, request.work, bits):
            raise MailboxRefused(
                f"taking a prekey without a token needs proof of work ({bits} bits)"
            )
        if not self.work.first_use(box + subject + request.work, now, now + 180):
            raise MailboxRefused("that proof of work was used already")
        return STRANGERS

    def _check_proof(self, request: Request, owner_key: bytes, now: float) -> None:
        if not self.challenges.valid(request.mailbox_id, request.nonce, now):
            raise DecryptError()
        verify_signature(
            owner_key,
            proof_message(
                request.op,
                request.mailbox_id,
                request.nonce,
                request.prekeys if request.op == Op.ADD_PREKEYS else request.item_ids,
            ),
            request.signature,
        )
        if not self.challenges.spend(request.nonce, now):
            raise DecryptError()  # a replayed proof
