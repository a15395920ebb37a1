"""The libp2p host: Noise only (no plaintext, secio or TLS), yamux, a device
key persisted as a 32-byte seed so the peer ID is stable."""

from __future__ import annotations

import logging

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"


def quiet_libp2p_logs() -> None:
    """py-libp2p logs every normal stream end as a warning: keep only errors."""
    for name in ("libp2p", "multiaddr", "aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def peer_id_for(device_seed: bytes) -> ID:
    return ID.from_pubkey(create_new_key_pair(device_seed).public_key)


def build_host(device_seed: bytes, listen: list[str]) -> IHost:
    key_pair = create_new_key_pair(device_seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
    )


async def close_host(host: IHost) -> None:
    """Close listeners and connections even from a cancelled scope."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 5
        await host.close()
