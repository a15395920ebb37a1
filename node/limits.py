"""What a peer can make this node hold at once: streams, frame bytes, log lines.

Identities cost nothing on libp2p (a new peer ID is a new key pair), so a limit
per peer ID alone holds nothing back: every limit here is per peer *and* in
total.  Known peers (our contacts' devices and our own mailboxes: someone added
each one on purpose) are counted apart from everyone else, so that a crowd of
strangers can fill only the strangers' share and never stop a contact.

Bounds, per node, with the numbers below:

- Streams of our protocols open at once: per peer and in total for each
  protocol and each of the two classes (``StreamLimit``); one over the limit is
  reset at once.
- Frame bytes being read at once: a frame over ``SMALL_FRAME`` reserves its
  declared length from its class's ``FRAME_BUDGET`` before the body is read;
  smaller frames are bounded by the stream limits.  Together, at most
  ``2 * FRAME_BUDGET`` + (open streams) x ``SMALL_FRAME``: 64 MiB + 7 MiB
  (224 streams of our protocols per class, 448 in all).
- Log lines about refusals: at most one per peer per minute, and
  ``RefusalLog.max_lines`` per minute in all.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from pigeon.protocol import ProtocolError

log = logging.getLogger("pigeon.limits")

# Frames up to this size are read without a reservation.  Presence (16 B),
# notices (64 B), acks (8 KiB) and a Deliver frame of a few short texts (1 KiB
# envelopes) all fit, so everyday traffic never waits on the budget, and what these
# frames can hold is bounded by the stream limits: 448 streams x 16 KiB = 7 MiB.
SMALL_FRAME = 16 * 1024

# Bytes of larger frames being read at once, for each class of peer.  The
# largest frame is a Deliver of 2 MiB + 194: 32 MiB lets 15 of those, or 31
# largest mailbox deposits (1 MiB + 4 KiB), arrive at once from strangers and
# as many from contacts.  Genuine traffic needs far less: a burst of 500 texts
# goes as frames of 128 envelopes (about 140 KiB each) read one at a time on
# one stream.
FRAME_BUDGET = 32 * 1024 * 1024

# How long a frame waits for room in the budget before it is refused.  Genuine
# frames are read in milliseconds, so room comes back quickly unless the budget
# is held by frames that trickle in; those are not worth waiting for.
BUDGET_WAIT = 2.0


@dataclass(frozen=True)
class StreamLimit:
    """Inbound streams of one protocol open at once, per peer and in total."""

    per_peer: int
    total: int


# A courier keeps one stream per contact device; 4 leaves room for one being
# replaced while it closes.  32 in all: a node's contacts rarely all deliver at
# the same moment, and strangers' envelopes are refused anyway.
ENVELOPE_STREAMS = StreamLimit(per_peer=4, total=32)
# One hello per connection; 2 covers a reconnect overlapping the old one.
PRESENCE_STREAMS = StreamLimit(per_peer=2, total=32)
# A sender deposits for each of its contacts at once, and many of them may use
# the same mailbox; an owner collects on one stream at a time.  A mailbox
# serves many people, hence the larger total (frames are bounded by the budget).
MAILBOX_STREAMS = StreamLimit(per_peer=16, total=128)
# A contact asks for our record now and then, one request at a time.
RECORD_STREAMS = StreamLimit(per_peer=2, total=32)
# A peer asks whether we can reach it about twice an hour (reach.py).
DIALBACK_STREAMS = StreamLimit(per_peer=1, total=8)
# A mailbox sends an owner at most one notice per 0.2 s.
NOTIFY_STREAMS = StreamLimit(per_peer=4, total=32)


K = TypeVar("K", bound=Hashable)


class Slot:
    """One place taken in ``Slots``; give it back by leaving the ``with`` block
    (or ``release``).  Run the holder's work inside ``cancel_scope``: the place
    may be taken back early (``Slots`` with ``preempt_after``), which cancels it."""

    def __init__(self, release: Callable[[Slot], None], started: float) -> None:
        self._release = release
        self.started = started
        self.released = False
        self.preempted = False
        self.cancel_scope = trio.CancelScope()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)

    def preempt(self) -> None:
        self.preempted = True
        self.cancel_scope.cancel()
        self.release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Slots(Generic[K]):
    """Places counted per key and in total.

    ``take`` gives a ``Slot`` or None when the key holds ``per_key`` already or
    all ``total`` are taken.  With ``preempt_after``, a full set instead takes
    back its oldest place if that one is at least that old: for request-answer
    protocols whose genuine streams live milliseconds, so a place held longer is
    the one least worth keeping, and a crowd that holds every place stops no one
    unless it keeps opening new ones faster than that.
    """

    def __init__(
        self,
        per_key: int,
        total: int,
        *,
        preempt_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_key < 1 or total < 1:
            raise ValueError("limits must be at least 1")
        self.per_key = per_key
        self.total = total
        self.preempt_after = preempt_after
        self.clock = clock
        self._held: dict[K, int] = {}
        self._slots: dict[Slot, K] = {}  # in the order taken: the oldest first

    @property
    def in_use(self) -> int:
        return len(self._slots)

    def held(self, key: K) -> int:
        return self._held.get(key, 0)

    def take(self, key: K) -> Slot | None:
        if self.held(key) >= self.per_key:
            return None
        now = self.clock()
        if len(self._slots) >= self.total:
            oldest = next(iter(self._slots))
            if self.preempt_after is None or now - oldest.started < self.preempt_after:
                return None
            oldest.preempt()
        slot = Slot(self._give_back, now)
        self._slots[slot] = key
        self._held[key] = self.held(key) + 1
        return slot

    def _give_back(self, slot: Slot) -> None:
        key = self._slots.pop(slot)
        left = self._held[key] - 1
        if left:
            self._held[key] = left
        else:
            del self._held[key]


class OverBudget(ProtocolError):
    """A frame found no room in the byte budget in time."""


class ByteBudget:
    """Bytes reserved at once, at most ``total``; a reservation waits up to
    ``wait`` seconds for room, then raises ``OverBudget``."""

    def __init__(self, total: int, wait: float = BUDGET_WAIT) -> None:
        self.total = total
        self.wait = wait
        self.in_use = 0
        self._freed = trio.Event()

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        if size > self.total:
            raise OverBudget(f"a {size}-byte frame is over the whole {self.total}-byte budget")
        deadline = trio.current_time() + self.wait
        while self.in_use + size > self.total:
            with trio.move_on_at(deadline) as waited:
                await self._freed.wait()
            if waited.cancelled_caught and self.in_use + size > self.total:
                raise OverBudget(
                    f"no room for a {size}-byte frame: {self.in_use} of {self.total} bytes"
                    " are being read"
                )
        self.in_use += size
        try:
            yield
        finally:
            self.in_use -= size
            self._freed.set()
            self._freed = trio.Event()


# The budget an inbound stream's frames are read under, set when the stream is
# admitted.  Streams we open have none: what they bring is bounded by how many
# requests of our own we make at once.
_stream_budgets: weakref.WeakKeyDictionary[INetStream, ByteBudget] = weakref.WeakKeyDictionary()


def set_budget(stream: INetStream, budget: ByteBudget) -> None:
    _stream_budgets[stream] = budget


def budget_of(stream: INetStream) -> ByteBudget | None:
    return _stream_budgets.get(stream)


class RefusalLog:
    """Log a refusal at most once per key per ``interval`` and ``max_lines``
    times per ``interval`` in all; what was left out is counted in one line."""

    def __init__(
        self,
        logger: logging.Logger = log,
        *,
        interval: float = 60.0,
        max_lines: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_lines = max_lines
        self.clock = clock
        self._last: OrderedDict[object, float] = OrderedDict()  # key -> when last logged
        self._window_start = -float("inf")
        self._lines = 0
        self._unlogged = 0

    def refused(self, key: object, message: str, *args: object) -> bool:
        """Log ``message % args`` if allowed now; whether it was."""
        now = self.clock()
        if now - self._window_start >= self.interval:
            if self._unlogged:
                self.logger.warning(
                    "%d more refusals in the last %.0f s were not logged",
                    self._unlogged,
                    self.interval,
                )
            self._window_start, self._lines, self._unlogged = now, 0, 0
        # Only logged keys are remembered, and at most max_lines a window, so
        # this stays small however many peers are refused.
        while self._last and now - next(iter(self._last.values())) >= self.interval:
            self._last.popitem(last=False)
        if key in self._last or self._lines >= self.max_lines:
            self._unlogged += 1
            return False
        self._last[key] = now
        self._lines += 1
        self.logger.warning(message, *args)
        return True


# One for the process: a daemon runs one node, and the point is a log that a
# flood cannot flood.
REFUSALS = RefusalLog()

Handler = Callable[[INetStream], Awaitable[None]]


async def reset(stream: INetStream) -> None:
    """Reset a stream, whatever state it is in."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            return


async def refuse(stream: INetStream, what: str, slots: Slots[ID], refusals: RefusalLog) -> None:
    """Reset a stream its peer has no place for, saying why (within the log's bounds)."""
    peer = stream.muxed_conn.peer_id
    refusals.refused(
        peer,
        "peer=%s %s refused: %d of its own open (limit %d), %d in all (limit %d)",
        peer,
        what,
        slots.held(peer),
        slots.per_key,
        slots.in_use,
        slots.total,
    )
    await reset(stream)


class Admission:
    """Admits the inbound streams of a node's protocols.

    Each stream is counted in its protocol's ``Slots`` for its class of peer
    (``is_known``: contacts' devices and our mailboxes, or anyone else), and its
    frames are read under that class's ``ByteBudget``.  A stream over a limit
    is reset at once.
    """

    def __init__(
        self,
        is_known: Callable[[ID], bool],
        *,
        budget: int = FRAME_BUDGET,
        refusals: RefusalLog = REFUSALS,
    ) -> None:
        self.is_known = is_known
        self.refusals = refusals
        self.budgets = {True: ByteBudget(budget), False: ByteBudget(budget)}
        self.slots: dict[tuple[str, bool], Slots[ID]] = {}

    def guard(self, protocol: str, limit: StreamLimit, handler: Handler) -> Handler:
        for known in (True, False):
            self.slots[protocol, known] = Slots(limit.per_peer, limit.total)

        async def admitted(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            try:
                known = self.is_known(peer)
            except Exception:
                await reset(stream)  # the caller's error boundary logs it
                raise
            slots = self.slots[protocol, known]
            slot = slots.take(peer)
            if slot is None:
                await refuse(stream, f"{protocol} stream", slots, self.refusals)
                return
            set_budget(stream, self.budgets[known])
            with slot:
                await handler(stream)

        admitted.__qualname__ = getattr(handler, "__qualname__", protocol)
        return admitted
