"""Small builders shared by the tests: parties, records and sessions built
through the public API, and a database connection that can be held mid-way."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from pigeon.node.storage import Database
from pigeon.protocol import (
    PIGEON,
    Device,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    OneTimePrekey,
    RatchetConfig,
    Session,
    SignedPrekey,
)
from pigeon.protocol.crypto import x25519_keypair
from pigeon.protocol.mailbox import (
    REGISTER_WORK_BITS,
    DepositToken,
    Op,
    Request,
    do_work,
    mailbox_id,
)
from pigeon.protocol.records import MailboxEntry

NOW = 1_800_000_000


@dataclass
class Party:
    """An identity with a signed prekey and a few one-time prekeys."""

    name: str
    identity: IdentityKeyPair = field(default_factory=lambda: IdentityKeyPair.generate(os.urandom))
    signed_prekeys: dict[int, bytes] = field(default_factory=dict)
    one_time_prekeys: dict[int, bytes] = field(default_factory=dict)
    spk: SignedPrekey | None = None

    def __post_init__(self) -> None:
        self.rotate_signed_prekey(1)

    def rotate_signed_prekey(self, prekey_id: int) -> None:
        private, public = x25519_keypair(os.urandom)
        self.signed_prekeys[prekey_id] = private
        self.spk = SignedPrekey(prekey_id, public, NOW)

    def record(
        self,
        sequence: int = 1,
        expires_at: int = NOW + 86400,
        devices: tuple[Device, ...] = (),
        mailboxes: tuple[MailboxEntry, ...] = (),
    ) -> DirectoryRecord:
        assert self.spk is not None
        return DirectoryRecord(
            self.identity.public_key,
            self.name,
            sequence,
            NOW,
            expires_at,
            self.spk,
            devices,
            mailboxes,
        )

    def one_time_prekey(self, prekey_id: int) -> OneTimePrekey:
        otk, private = OneTimePrekey.create(self.identity, prekey_id, os.urandom)
        self.one_time_prekeys[prekey_id] = private
        return otk

    def respond(self, message: bytes, config: RatchetConfig = PIGEON) -> tuple[Session, bytes]:
        return Session.respond(
            self.identity,
            IncomingMessage.decode(message),
            self.signed_prekeys.get,
            self.one_time_prekeys.get,
            os.urandom,
            config,
        )


def initiate(
    alice: Party,
    bob: Party,
    config: RatchetConfig = PIGEON,
    one_time_prekey: OneTimePrekey | None = None,
) -> Session:
    """Alice starts a session from Bob's published record, verified as a
    node verifies what it fetched."""
    published = bob.record().sign(bob.identity)
    bundle = DirectoryRecord.verify(published, now=NOW).bundle(one_time_prekey)
    return Session.initiate(alice.identity, bundle, os.urandom, config)


def deliver(receiver: Session, message: bytes) -> bytes:
    return receiver.decrypt(IncomingMessage.decode(message))


def establish(
    config: RatchetConfig = PIGEON,
    alice: Party | None = None,
    bob: Party | None = None,
    one_time_prekey: Callable[[Party], OneTimePrekey | None] = lambda bob: bob.one_time_prekey(7),
) -> tuple[Session, Session]:
    """An established pair: Alice initiated, Bob answered, Alice heard back."""
    alice, bob = alice or Party("alice"), bob or Party("bob")
    a = initiate(alice, bob, config, one_time_prekey(bob))
    b, first = bob.respond(a.encrypt(b"first"), config)
    assert first == b"first"
    assert deliver(a, b.encrypt(b"reply")) == b"reply"
    assert a.pending is None
    return a, b


def session_pair(
    config: RatchetConfig = PIGEON, *, with_one_time_prekey: bool = True
) -> tuple[Session, Session]:
    def prekey(bob: Party) -> OneTimePrekey | None:
        return bob.one_time_prekey(7) if with_one_time_prekey else None

    return establish(config, one_time_prekey=prekey)


class HeldDatabase(Database):
    """A real connection that calls ``hold`` just before it deletes a mailbox
    prekey: after reading the last prekey, before forgetting it."""

    hold: Callable[[], None] | None = None

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        if self.hold is not None and sql.lstrip().upper().startswith("DELETE FROM MAILBOX_PREKEYS"):
            self.hold()
        return super().execute(sql, params)


def work_start() -> int:
    """A random place to start counting work, as clients do."""
    return int.from_bytes(os.urandom(6), "big")


def register_request(key: SigningKey, bits: int = REGISTER_WORK_BITS) -> Request:
    """REGISTER for ``key``, with the proof of work a mailbox asks for."""
    public = bytes(key.verify_key)
    work = do_work(Op.REGISTER, mailbox_id(public), public, bits, work_start())
    return Request(Op.REGISTER, public_key=public, work=work)


def deposit_token(key: SigningKey, expires_at: int | None = None) -> bytes:
    """A deposit token the owner of mailbox key ``key`` gives a contact."""
    expires = int(time.time()) + 3600 if expires_at is None else expires_at
    token = DepositToken.issue(
        bytes(key.verify_key), lambda m: key.sign(m).signature, os.urandom(16), expires
    )
    return token.encode()
