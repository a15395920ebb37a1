"""The one exception tree of Pigeon.

Every error Pigeon raises on purpose derives from :class:`PigeonError`.
Errors caused by what a peer sent are :class:`ProtocolError`; errors caused by
how local code called us are :class:`LocalProtocolError`.
"""

from __future__ import annotations


class PigeonError(Exception):
    """Root of every error Pigeon raises on purpose."""


class ProtocolError(PigeonError):
    """Bytes from outside (a peer, a file, a user) could not be accepted."""


class DecryptError(ProtocolError):
    """Decryption or signature verification failed.

    Deliberately opaque: it never says which check failed, and whatever raised
    it has left its state exactly as it was before the call.
    """

    def __init__(self, message: str = "message could not be authenticated or decrypted") -> None:
        super().__init__(message)


class RecordError(ProtocolError):
    """A signed record is well-formed and authentic but not acceptable now
    (expired, from the future, for another identity, or older than ours)."""


class LocalProtocolError(PigeonError):
    """Local code asked for something the protocol does not allow."""
