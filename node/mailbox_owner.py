"""Our own mailboxes, as a recipient: keep k of them registered, collect
from them (at start-up, on an interval, on reconnect, when one pushes a
notice), replace one that stays unreachable, and keep each stocked with
one-time prekeys.  See docs/protocol/mailbox.md."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey

from pigeon.protocol import ProtocolError
from pigeon.protocol.mailbox import Op, Request, mailbox_id, proof_message
from pigeon.protocol.wire import Fields

from .framing import ACK_STORED, read_frame
from .mailbox import PROVIDER_KEY, addrs
from .mailbox import call as mailbox_call

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("pigeon.mailbox")

PREKEY_REFILL_BELOW = 10  # as Signal: refill below 10, in batches of 100
PREKEY_BATCH = 100
MAILBOX_MAX_FAILURES = 3  # consecutive failed collections before a mailbox is replaced


class MailboxOwner:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.collect_now = trio.Event()
        self._searches = 0

    def is_mailbox(self, peer: ID) -> bool:
        return peer.to_bytes() in {p for p, _ in self.my_mailboxes()}

    @property
    def mailbox_key(self) -> SigningKey:
        seed = self.node.db.get_meta("mailbox_seed")
        if seed is None:
            seed = os.urandom(32)
            with self.node.db.transaction():
                self.node.db.set_meta("mailbox_seed", seed)
        return SigningKey(seed)

    @property
    def mailbox_id(self) -> bytes:
        return mailbox_id(bytes(self.mailbox_key.verify_key))

    def my_mailboxes(self) -> list[tuple[bytes, list[str]]]:
        return [
            (bytes(r[0]), list(json.loads(r[1])))
            for r in self.node.db.all(
                "SELECT peer_id, addresses FROM my_mailboxes ORDER BY registered_at"
            )
        ]

    async def run(self) -> None:
        """Keep k mailboxes registered, and collect from them: at start-up,
        on every interval, and when asked."""
        while True:
            try:
                if await self._ensure_mailboxes():
                    self.node.republish()
                await self.collect_mailboxes()
            except Exception as error:
                log.warning("mailbox upkeep failed: %s", error)
            wait = self.node.config.mailbox_interval
            if len(self.my_mailboxes()) < self.node.config.mailbox_count:
                # still looking for mailboxes: soon at first, then less often
                wait = min(wait, 5.0 * 2 ** min(self._searches, 8))
                self._searches += 1
            else:
                self._searches = 0
            with trio.move_on_after(wait):
                await self.collect_now.wait()
            self.collect_now = trio.Event()

    async def _ensure_mailboxes(self) -> bool:
        have = {peer for peer, _ in self.my_mailboxes()}
        if len(have) >= self.node.config.mailbox_count:
            return False
        changed = False
        with trio.move_on_after(20):
            providers = await self.node.dht.find_providers(PROVIDER_KEY, 20)
            seen = set()
            for info in providers:
                raw = info.peer_id.to_bytes()
                if raw in have or raw in seen or info.peer_id == self.node.host.get_id():
                    continue
                seen.add(raw)
                if len(have) >= self.node.config.mailbox_count:
                    break
                try:
                    (reply,) = await mailbox_call(
                        self.node.host,
                        info,
                        [Request(Op.REGISTER, public_key=bytes(self.mailbox_key.verify_key))],
                    )
                except Exception as error:
                    log.info("mailbox %s did not answer: %s", info.peer_id, error)
                    continue
                if not reply.ok:
                    log.info("mailbox %s refused us: %s", info.peer_id, reply.error)
                    continue
                addresses = [f"{a}/p2p/{info.peer_id}" for a in info.addrs]
                with self.node.db.transaction():
                    self.node.db.execute(
                        "INSERT OR REPLACE INTO my_mailboxes (peer_id, addresses, registered_at)"
                        " VALUES (?, ?, ?)",
                        (raw, json.dumps(addresses), int(time.time())),
                    )
                have.add(raw)
                changed = True
                log.info("registered with mailbox %s", info.peer_id)
        return changed

    async def collect_mailboxes(self) -> int:
        """Fetch, store and then delete what our mailboxes hold for us."""
        total = 0
        for peer_raw, addresses in self.my_mailboxes():
            info = PeerInfo(ID(peer_raw), addrs(addresses))
            try:
                total += await self._collect_from(info)
                self.node.db.execute(
                    "UPDATE my_mailboxes SET failures = 0 WHERE peer_id = ?", (peer_raw,)
                )
            except Exception as error:
                log.info("collecting from mailbox %s failed: %s", info.peer_id, error)
                self.node.db.execute(
                    "UPDATE my_mailboxes SET failures = failures + 1 WHERE peer_id = ?", (peer_raw,)
                )
                row = self.node.db.one(
                    "SELECT failures FROM my_mailboxes WHERE peer_id = ?", (peer_raw,)
                )
                if row is not None and row[0] >= MAILBOX_MAX_FAILURES:
                    log.warning("mailbox %s stays unreachable: replacing it", info.peer_id)
                    self.node.db.execute("DELETE FROM my_mailboxes WHERE peer_id = ?", (peer_raw,))
                    self.collect_now.set()
        return total

    async def _collect_from(self, info: PeerInfo) -> int:
        box, key = self.mailbox_id, self.mailbox_key
        collected = 0
        while True:
            (challenge,) = await mailbox_call(self.node.host, info, [Request(Op.CHALLENGE, box)])
            nonce = challenge.nonce
            signature = key.sign(proof_message(Op.FETCH, box, nonce)).signature
            (fetched,) = await mailbox_call(
                self.node.host, info, [Request(Op.FETCH, box, nonce=nonce, signature=signature)]
            )
            if not fetched.ok:
                raise ProtocolError(f"mailbox refused our pickup: {fetched.error}")
            if not fetched.items:
                await self._refill_prekeys(info, fetched.prekeys_left)
                return collected
            statuses = self.node.accept([item.envelope for item in fetched.items], info.peer_id)
            collected += statuses.count(ACK_STORED)
            done = tuple(item.item_id for item in fetched.items)
            (challenge,) = await mailbox_call(self.node.host, info, [Request(Op.CHALLENGE, box)])
            signature = key.sign(proof_message(Op.DELETE, box, challenge.nonce, done)).signature
            await mailbox_call(
                self.node.host,
                info,
                [
                    Request(
                        Op.DELETE, box, nonce=challenge.nonce, signature=signature, item_ids=done
                    )
                ],
            )

    async def _refill_prekeys(self, info: PeerInfo, left: int) -> None:
        if left >= PREKEY_REFILL_BELOW:
            return
        prekeys = self.node.conversations.new_one_time_prekeys(
            PREKEY_BATCH, info.peer_id.to_bytes()
        )
        encoded = tuple(p.encode() for p in prekeys)
        box = self.mailbox_id
        (challenge,) = await mailbox_call(self.node.host, info, [Request(Op.CHALLENGE, box)])
        signature = self.mailbox_key.sign(
            proof_message(Op.ADD_PREKEYS, box, challenge.nonce, encoded)
        ).signature
        (reply,) = await mailbox_call(
            self.node.host,
            info,
            [
                Request(
                    Op.ADD_PREKEYS, box, nonce=challenge.nonce, signature=signature, prekeys=encoded
                )
            ],
        )
        if reply.ok:
            log.info("left %d one-time prekeys with mailbox %s", len(encoded), info.peer_id)

    async def handle_notify(self, stream: INetStream) -> None:
        """As an owner: a mailbox says something arrived; collect now."""
        peer = stream.muxed_conn.peer_id
        try:
            box = Fields(await read_frame(stream, 64, timeout=5)).bytes_(1, size=16)
            mine = peer.to_bytes() in {p for p, _ in self.my_mailboxes()}
            if box == self.mailbox_id and mine:
                self.collect_now.set()
        except Exception as error:
            log.info("peer=%s sent a bad mailbox notice: %s", peer, type(error).__name__)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
