"""Pigeon's protocol core: keys, X3DH, the Double Ratchet, sealed envelopes,
application messages and safety numbers.

Pure: bytes and values in, bytes and values out.  No networking, storage,
clock or event loop is imported here (a test enforces it); randomness and
time are parameters.
"""

from .contact import ContactCode
from .crypto import Random, system_random
from .envelope import Opened, open_envelope, seal
from .errors import DecryptError, LocalProtocolError, PigeonError, ProtocolError, RecordError
from .fingerprint import (
    compare_scannable,
    format_safety_number,
    safety_number,
    scannable_fingerprint,
    scannable_from_qr_text,
    scannable_to_qr_text,
)
from .keys import IdentityKeyPair, identity_id
from .messages import (
    MAX_TEXT_BYTES,
    MAX_TIMER,
    AppMessage,
    ByeReason,
    Content,
    FileOffer,
    Introduction,
    MailboxToken,
    Receipt,
    ReceiptType,
    ResetReason,
    SessionReset,
    SignalType,
    Text,
    Timer,
    Unknown,
    WebRTCSignal,
    check_text,
    fit_reason,
)
from .ratchet import CLASSIC, PIGEON, RatchetConfig, RatchetState
from .records import (
    Device,
    DeviceCertificate,
    DirectoryRecord,
    OneTimePrekey,
    PrekeyBundle,
    Rotation,
    SignedPrekey,
    dht_key,
)
from .session import IncomingMessage, Session

__all__ = [
    "CLASSIC",
    "MAX_TEXT_BYTES",
    "MAX_TIMER",
    "PIGEON",
    "AppMessage",
    "ByeReason",
    "ContactCode",
    "Content",
    "DecryptError",
    "Device",
    "DeviceCertificate",
    "DirectoryRecord",
    "FileOffer",
    "IdentityKeyPair",
    "IncomingMessage",
    "Introduction",
    "LocalProtocolError",
    "MailboxToken",
    "OneTimePrekey",
    "Opened",
    "PigeonError",
    "PrekeyBundle",
    "ProtocolError",
    "Random",
    "RatchetConfig",
    "RatchetState",
    "Receipt",
    "ReceiptType",
    "RecordError",
    "ResetReason",
    "Rotation",
    "Session",
    "SessionReset",
    "SignalType",
    "SignedPrekey",
    "Text",
    "Timer",
    "Unknown",
    "WebRTCSignal",
    "check_text",
    "compare_scannable",
    "dht_key",
    "fit_reason",
    "format_safety_number",
    "identity_id",
    "open_envelope",
    "safety_number",
    "scannable_fingerprint",
    "scannable_from_qr_text",
    "scannable_to_qr_text",
    "seal",
    "system_random",
]
