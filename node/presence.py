"""Presence (``/pigeon/presence/1.0.0``): a contact is online while we hold a
live connection to one of its devices and that device said so.  Each side
announces itself once per connection, to contacts only; there is no
heartbeat.  ``--no-presence`` answers but never announces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from pigeon.protocol.frames import MAX_PRESENCE_FRAME, Presence

from .framing import StreamClosed, frame, read_frame
from .limits import REFUSALS

log = logging.getLogger("pigeon.presence")

PRESENCE_PROTOCOL = TProtocol("/pigeon/presence/1.0.0")


class PresenceService:
    def __init__(
        self,
        host: IHost,
        contact_for_peer: Callable[[bytes], bytes | None],
        on_contact: Callable[[bytes], None],
        *,
        announce: bool,
    ) -> None:
        self.host = host
        self.contact_for_peer = contact_for_peer
        self.on_contact = on_contact  # a contact's device said it is online
        self.announce = announce
        self._present: set[ID] = set()  # contact devices that announced themselves
        self._greeted: set[ID] = set()  # contact devices we announced ourselves to

    def is_present(self, peer: ID) -> bool:
        return peer in self._present and bool(self.host.get_network().get_connections(peer))

    def disconnected(self, peer: ID) -> None:
        self._present.discard(peer)
        self._greeted.discard(peer)

    async def greet(self, peer: ID) -> None:
        """Tell a contact's device, once per connection, that we are online."""
        if not self.announce or peer in self._greeted:
            return
        key = self.contact_for_peer(peer.to_bytes())
        if key is None:
            return
        self._greeted.add(peer)
        try:
            with trio.fail_after(5):
                stream = await self.host.new_stream(peer, [PRESENCE_PROTOCOL])
                await stream.write(frame(Presence(True).encode()))
                answer = Presence.decode(await read_frame(stream, MAX_PRESENCE_FRAME, timeout=5))
                await stream.close()
            if answer.online:
                self._present.add(peer)
                self.on_contact(key)
        except Exception as error:
            self._greeted.discard(peer)
            log.debug("presence hello to %s failed: %s", peer, error)

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            hello = Presence.decode(await read_frame(stream, MAX_PRESENCE_FRAME, timeout=5))
            key = self.contact_for_peer(peer.to_bytes())
            if key is not None and hello.online:
                self._present.add(peer)
                self.on_contact(key)
            # answer with our own presence, to contacts only
            await stream.write(frame(Presence(key is not None and self.announce).encode()))
        except StreamClosed:
            log.debug("peer=%s closed a presence stream before its hello", peer)
        except trio.TooSlowError:
            # a peer's loop too busy to say hello in time, more often than hostility
            REFUSALS.refused(peer, "peer=%s sent no presence hello in time, closed", peer)
        except Exception as error:
            REFUSALS.refused(
                peer, "peer=%s sent a bad presence frame: %s", peer, type(error).__name__
            )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
