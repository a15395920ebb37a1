"""The mailbox protocol handler (``/pigeon/mailbox/1.0.0``, docs/protocol/mailbox.md):
one request, one response, per frame.

Deposits that arrive together are stored together (``GroupCommit``): one
transaction, one fsync, for all of them, and each is answered only once that
transaction has committed, so an acknowledged deposit is on disk.  A stream's
requests are read ahead of their answers (a few, see PIPELINE_*), so the
deposits a node pipelines on one stream join the same group; answers go back
in the order of the requests.

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
from collections.abc import Awaitable, Callable

import trio
import trio.testing
from libp2p.abc import INetStream

from pigeon.protocol import DecryptError, PigeonError, ProtocolError, Random
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

from .framing import StreamClosed, frame, read_frame
from .limits import REFUSALS, OverBudget
from .mailbox_store import STRANGERS, Deposit, MailboxLimits, MailboxRefused, MailboxStore

log = logging.getLogger("pigeon.mailbox")

MAX_KEYS = 10_000  # peers or tokens a rate limiter remembers at once
MAX_SPENT = 100_000  # spent nonces and proofs of work remembered at once
_TIME = struct.Struct(">Q")

# Requests of one stream read ahead of their answers: at most this many, and
# no more once this many bytes wait (a larger request is read alone), so a
# stream holds at most PIPELINE_BYTES more than one largest request.
PIPELINE_REQUESTS = 64
PIPELINE_BYTES = 128 * 1024
# A group of deposits stored in one transaction: at most this many deposits
# and bytes.  Its first deposit waits for others to join while the event loop
# has other work (a stream reading the next deposit, say), that is until no
# task can run and no data is waiting, and GROUP_WAIT seconds at most.
GROUP_ITEMS = 256
GROUP_BYTES = 4 * 1024 * 1024
GROUP_WAIT = 0.005


class GroupFailed(PigeonError):
    """The transaction a deposit was part of did not commit: it is not stored."""


class Waiting:
    """A deposit queued for the next group commit."""

    def __init__(self, deposit: Deposit) -> None:
        self.deposit = deposit
        self.done = trio.Event()
        self.result: bytes | MailboxRefused | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Deposits stored in groups, one transaction (one fsync) for each.

    ``add`` queues a deposit; when no group is gathering, the caller starts
    ``lead``, which lets the deposits already on their way join (while the
    event loop has other work: see GROUP_*), stores them all with ``commit``
    (which returns once they are durable) and then sets each one's result
    and ``done``.  Deposits that arrive meanwhile form the next group, which
    is committed once this one is.  ``lead`` is shielded from cancellation:
    a group is always committed, or failed, as a whole, whoever started it.
    """

    def __init__(
        self,
        commit: Callable[[list[Deposit]], Awaitable[list[bytes | MailboxRefused]]],
        *,
        max_items: int = GROUP_ITEMS,
        max_bytes: int = GROUP_BYTES,
        wait: float = GROUP_WAIT,
    ) -> None:
        self._commit = commit
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.wait = wait
        self._queue: list[Waiting] = []
        self._bytes = 0
        self._leading = False
        self._gathering: trio.CancelScope | None = None
        self._previous: trio.Event | None = None  # set once the last group has ended
        self.groups = 0  # committed so far, for tests and statistics

    def add(self, deposit: Deposit) -> tuple[Waiting, bool]:
        """Queue a deposit: (its place, whether the caller must start ``lead``)."""
        waiting = Waiting(deposit)
        self._queue.append(waiting)
        self._bytes += len(deposit.envelope)
        leads = not self._leading
        self._leading = True
        if self._gathering is not None and self._full():
            self._gathering.cancel()
        return waiting, leads

    async def lead(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(self.wait) as self._gathering:
                    if not self._full():
                        # (trio's, and not only for tests: it returns when
                        # nothing else can run and no data has arrived)
                        await trio.testing.wait_all_tasks_blocked()
            finally:
                self._gathering = None
            group, self._queue, self._bytes = self._queue, [], 0
            self._leading = False
            previous, self._previous = self._previous, trio.Event()
            ended = self._previous
            try:
                if previous is not None:
                    await previous.wait()  # one after the other, the loop free meanwhile
                results = await self._commit([waiting.deposit for waiting in group])
                for waiting, result in zip(group, results, strict=True):
                    waiting.result = result
                self.groups += 1
            except Exception as error:
                log.warning("%d deposits were not stored: %s", len(group), error)
                for waiting in group:
                    waiting.error = error
            finally:
                for waiting in group:
                    waiting.done.set()
                ended.set()

    def _full(self) -> bool:
        return len(self._queue) >= self.max_items or self._bytes >= self.max_bytes


class _Room:
    """Bytes of a stream's requests waiting for their answers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = trio.Event()

    async def wait(self) -> None:
        while self.used >= self.limit:
            await self._freed.wait()

    def take(self, size: int) -> None:
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        self._freed.set()
        self._freed = trio.Event()


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
        self._verified: collections.OrderedDict[bytes, DepositToken] = collections.OrderedDict()
        # mailbox -> the peer that last proved it owns it: told when something
        # arrives.  Bounded by the owners, which are bounded.
        self.owners_seen: dict[bytes, object] = {}
        self.on_deposit: Callable[[bytes, object], None] | None = None
        self.stats = {"deposits": 0, "refused": 0, "fetched": 0}
        self.group = GroupCommit(store.deposit_group)

    async def handle(self, stream: INetStream) -> None:
        """Serve one stream until the peer closes it: requests read ahead of
        their answers (PIPELINE_*), answers in order, a deposit's once its
        group is committed.  A frame that is too large, malformed or late ends
        the stream with one log line, after the answers already due."""
        peer = stream.muxed_conn.peer_id
        answers, queued = trio.open_memory_channel[tuple[Response | Waiting, int]](
            PIPELINE_REQUESTS
        )
        room = _Room(PIPELINE_BYTES)
        ended: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_answers, stream, queued, room, peer)
                async with answers:
                    ended = await self._read_requests(stream, answers, room, peer, nursery)
            if isinstance(ended, OverBudget):
                REFUSALS.refused(peer, "peer=%s mailbox frame refused: %s", peer, ended)
            elif isinstance(ended, ProtocolError):
                REFUSALS.refused(peer, "peer=%s sent a bad mailbox frame: %s", peer, ended)
            elif isinstance(ended, trio.TooSlowError):
                REFUSALS.refused(peer, "peer=%s mailbox stream idle, closed", peer)
        except Exception as error:
            while isinstance(error, ExceptionGroup) and error.exceptions:
                error = error.exceptions[0]  # what ended the stream, not the nursery's wrapper
            log.info("peer=%s mailbox stream ended: %s", peer, type(error).__name__)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()

    async def _read_requests(
        self,
        stream: INetStream,
        answers: trio.MemorySendChannel[tuple[Response | Waiting, int]],
        room: _Room,
        peer: object,
        nursery: trio.Nursery,
    ) -> Exception | None:
        """Read and start answering requests until the stream ends; why it
        ended, when not cleanly."""
        while True:
            await room.wait()
            try:
                data = await read_frame(stream, MAX_REQUEST_SIZE)
            except StreamClosed:
                return None
            except (ProtocolError, trio.TooSlowError) as error:
                return error
            decided = self._decide(data, peer)
            answer: Response | Waiting
            if isinstance(decided, Deposit):
                answer, leads = self.group.add(decided)
                if leads:
                    nursery.start_soon(self.group.lead)
            else:
                answer = decided
            room.take(len(data))
            await answers.send((answer, len(data)))

    async def _write_answers(
        self,
        stream: INetStream,
        queued: trio.MemoryReceiveChannel[tuple[Response | Waiting, int]],
        room: _Room,
        peer: object,
    ) -> None:
        """Answers in the order of the requests; those ready together (a
        group's deposits) go in one write."""
        async with queued:
            following: tuple[Response | Waiting, int] | None = None
            while True:
                if following is None:
                    try:
                        following = await queued.receive()
                    except trio.EndOfChannel:
                        return
                answer, size = following
                following = None
                if isinstance(answer, Waiting):
                    await answer.done.wait()
                frames, sizes = [], 0
                while True:
                    frames.append(frame(self._response(answer, peer).encode()))
                    sizes += size
                    if sizes >= PIPELINE_BYTES:
                        break
                    try:
                        answer, size = queued.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if isinstance(answer, Waiting) and not answer.done.is_set():
                        following = (answer, size)
                        break
                await stream.write(b"".join(frames))
                room.give(sizes)

    def _response(self, answer: Response | Waiting, peer: object) -> Response:
        """A ready answer's response (a deposit's once its group has ended)."""
        if isinstance(answer, Response):
            return answer
        if answer.result is None:
            raise GroupFailed(f"the deposit was not stored: {answer.error!r}")
        return self._deposited(answer.deposit, answer.result, peer)

    def answer(self, data: bytes, peer: object) -> Response:
        """The answer to one request; a deposit is stored (and committed) alone."""
        answer = self._decide(data, peer)
        if isinstance(answer, Deposit):
            (result,) = self.store.deposit_many([answer])
            return self._deposited(answer, result, peer)
        return answer

    def _decide(self, data: bytes, peer: object) -> Response | Deposit:
        """The answer to a request; for a deposit that passed the checks made
        before storing (payment, rate limits), the deposit to store."""
        try:
            request = Request.decode(data)
            return self._answer(request, peer)
        except MailboxRefused as error:
            return self._refused(error, peer)
        except DecryptError:
            self.stats["refused"] += 1
            log.info("peer=%s mailbox proof refused", peer)
            return Response(ok=False, error="proof refused")

    def _refused(self, error: MailboxRefused, peer: object) -> Response:
        self.stats["refused"] += 1
        log.info("peer=%s mailbox request refused: %s", peer, error)
        return Response(ok=False, error=str(error))

    def _deposited(
        self, deposit: Deposit, result: bytes | MailboxRefused, peer: object
    ) -> Response:
        if isinstance(result, MailboxRefused):
            return self._refused(result, peer)
        self.stats["deposits"] += 1
        owner = self.owners_seen.get(deposit.box)
        if owner is not None and self.on_deposit is not None:
            self.on_deposit(deposit.box, owner)
        return Response(ok=True, item_id=result)

    def _answer(self, request: Request, peer: object) -> Response | Deposit:
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
            return Deposit(box, request.envelope, request.ttl_s, int(now), source)
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
                token = self._token(request.token, owner_key, int(now))
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

    def _token(self, raw: bytes, owner_key: bytes, now: int) -> DepositToken:
        """The deposit token, checked (DepositToken.verify): its signature
        only the first time, as long as it is remembered (MAX_KEYS tokens,
        the least recently used forgotten first; only valid ones, which only
        owners can make)."""
        key = owner_key + raw
        token = self._verified.pop(key, None)
        if token is None:
            token = DepositToken.decode(raw)
            token.verify(owner_key, now)
        elif token.expires_at <= now:
            raise ProtocolError("the deposit token has expired")
        self._verified[key] = token
        while len(self._verified) > MAX_KEYS:
            self._verified.popitem(last=False)
        return token

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
