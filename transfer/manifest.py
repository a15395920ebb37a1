"""Manifests: how a file is cut into chunks, encrypted, and committed to by a
Merkle root over the encrypted chunks (docs/protocol/files.md).

Pure: the caller reads and writes the file; the key comes in as bytes or from
a ``Random`` it passes.  No I/O, no clock and no randomness source here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from pigeon.protocol.crypto import Random, aead_decrypt, aead_encrypt
from pigeon.protocol.errors import LocalProtocolError, ProtocolError

from .reference import (
    DEFAULT_CHUNK,
    HASH_SIZE,
    MAX_CHUNK,
    MAX_CHUNKS,
    MAX_NAME_BYTES,
    MIN_CHUNK,
    FileRef,
    check_geometry,
    check_name,
)

__all__ = [
    "DEFAULT_CHUNK",
    "HASH_SIZE",
    "KEY_SIZE",
    "MAX_CHUNK",
    "MAX_CHUNKS",
    "MAX_HASHES_PER_PAGE",
    "MAX_NAME_BYTES",
    "MIN_CHUNK",
    "TAG_SIZE",
    "Manifest",
    "ManifestBuilder",
    "check_range",
    "chunk_count",
    "chunk_length",
    "hash_pages",
    "leaf_hash",
    "merkle_root",
    "new_key",
    "open_chunk",
    "seal_chunk",
    "verify_leaves",
]

KEY_SIZE = 32  # AES-256-GCM, one fresh key per file
TAG_SIZE = 16  # what encryption adds to each chunk
MAX_HASHES_PER_PAGE = 2048  # leaf hashes per HASHES message: 64 KiB
_CHUNK_CONTEXT = b"pigeon/file-chunk/v1"
_LEAF = b"\x00"  # domain prefixes: a leaf can never pass for an inner node
_NODE = b"\x01"


def new_key(random: Random) -> bytes:
    """A fresh file key, from the caller's randomness (``os.urandom`` in production)."""
    key = random(KEY_SIZE)
    if len(key) != KEY_SIZE:
        raise LocalProtocolError(f"randomness returned {len(key)} bytes, not {KEY_SIZE}")
    return key


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file has.  An empty file has one empty chunk, so every
    file has a leaf and a root."""
    return max(1, -(-size // chunk_size))


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """The plaintext length of chunk ``index``: ``chunk_size`` but for the last one."""
    if not 0 <= index < chunk_count(size, chunk_size):
        raise ProtocolError(f"chunk index {index} is past the end of the file")
    return min(chunk_size, size - index * chunk_size)


def _nonce(index: int) -> bytes:
    return bytes(4) + index.to_bytes(8, "big")


def _associated_data(size: int, chunk_size: int, index: int) -> bytes:
    """Binds a chunk to its place in a file of this exact layout."""
    return (
        _CHUNK_CONTEXT
        + size.to_bytes(8, "big")
        + chunk_size.to_bytes(4, "big")
        + index.to_bytes(8, "big")
    )


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise LocalProtocolError(f"a file key is {KEY_SIZE} bytes")


def seal_chunk(key: bytes, size: int, chunk_size: int, index: int, plaintext: bytes) -> bytes:
    """Encrypt chunk ``index`` of a file (AES-256-GCM; the nonce is the index).

    Deterministic: the same key, layout, index and plaintext always give the
    same ciphertext.  That is what lets a sender that restarts serve the
    chunks it described, and a receiver check the chunks on its disk after a
    crash by sealing them again and comparing leaf hashes.

    The price is a rule that must never be broken: **one key must never
    encrypt two different plaintexts at the same index** where anyone can see
    both (GCM with a repeated nonce leaks the XOR of the plaintexts and lets
    the authentication key be recovered).  A file can change on disk after
    its manifest was made, so the sender re-seals each chunk it is asked for
    and checks the ciphertext against the manifest's leaf
    (:meth:`Manifest.verify_chunk`) before sending it; when it does not
    match, the new ciphertext is dropped, never sent, and the transfer fails
    with "file changed".  A new version of a file gets a new key.
    """
    _check_key(key)
    expected = chunk_length(size, chunk_size, index)
    if len(plaintext) != expected:
        # The bytes come from a file, which may have changed since its size was taken.
        raise ProtocolError(f"chunk {index} is {len(plaintext)} bytes, not {expected}")
    return aead_encrypt(key, _nonce(index), plaintext, _associated_data(size, chunk_size, index))


def open_chunk(key: bytes, size: int, chunk_size: int, index: int, ciphertext: bytes) -> bytes:
    """Decrypt chunk ``index``; a wrong length is a ProtocolError and anything
    tampered (bytes, index, layout, key) the opaque DecryptError."""
    _check_key(key)
    expected = chunk_length(size, chunk_size, index) + TAG_SIZE
    if len(ciphertext) != expected:
        raise ProtocolError(f"encrypted chunk {index} must be {expected} bytes")
    return aead_decrypt(key, _nonce(index), ciphertext, _associated_data(size, chunk_size, index))


def leaf_hash(ciphertext: bytes) -> bytes:
    """A leaf of the tree: the hash of one encrypted chunk, so anyone holding
    chunks without the key (a second source, a mailbox) can verify them."""
    digest = hashlib.sha256(_LEAF)
    digest.update(ciphertext)
    return digest.digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root of the binary tree over ``leaves``, the leaf layer padded with
    zero hashes up to a power of two (as BitTorrent v2 does).

    Padding is added a layer at a time: an odd layer gets the root of an
    all-padding subtree of its height, which gives the same root as padding
    the leaves but hashes only what is needed.
    """
    if not leaves:
        raise LocalProtocolError("a tree needs at least one leaf")
    layer = list(leaves)
    padding = bytes(HASH_SIZE)
    while len(layer) > 1:
        if len(layer) % 2:
            layer.append(padding)
        layer = [_node(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        padding = _node(padding, padding)
    return layer[0]


def check_range(start: int, count: int, total: int, limit: int) -> None:
    """Refuse a request for items ``start .. start + count - 1`` (hashes or
    chunks) unless it asks for 1 to ``limit`` of the ``total`` that exist."""
    if not 1 <= count <= limit:
        raise ProtocolError(f"a request must name 1 to {limit} items, not {count}")
    if start < 0 or start + count > total:
        raise ProtocolError(f"a request runs past the end: the file has {total}")


def hash_pages(chunks: int) -> list[tuple[int, int]]:
    """(start, count) of each page a receiver asks for to fetch a file's leaf
    hashes, in order; every page but the last holds MAX_HASHES_PER_PAGE."""
    return [
        (start, min(MAX_HASHES_PER_PAGE, chunks - start))
        for start in range(0, chunks, MAX_HASHES_PER_PAGE)
    ]


@dataclass(frozen=True)
class Manifest:
    """A file's reference and the leaf hash of each of its encrypted chunks.
    Made by :class:`ManifestBuilder` (sender) or :func:`verify_leaves` (receiver)."""

    ref: FileRef
    leaves: tuple[bytes, ...] = field(repr=False)

    def page(self, start: int, count: int) -> tuple[bytes, ...]:
        """The leaf hashes a WANT_HASHES asks for; ProtocolError if it asks
        for more than a page or past the end."""
        check_range(start, count, len(self.leaves), MAX_HASHES_PER_PAGE)
        return self.leaves[start : start + count]

    def verify_chunk(self, index: int, ciphertext: bytes) -> None:
        """Refuse an encrypted chunk that is not the one the root commits to.

        The receiver checks every chunk before opening it (the root, not the
        key, fixes which file this is: GCM does not commit to its key).  The
        sender checks every chunk before sending it (see :func:`seal_chunk`).
        """
        if not 0 <= index < len(self.leaves):
            raise ProtocolError(f"chunk index {index} is past the end of the file")
        if leaf_hash(ciphertext) != self.leaves[index]:
            raise ProtocolError(f"chunk {index} does not match the file's manifest")


def verify_leaves(ref: FileRef, leaves: Sequence[bytes]) -> Manifest:
    """The manifest of ``ref`` if ``leaves`` are its leaf hashes: the right
    count, each 32 bytes, and together the root; ProtocolError otherwise."""
    expected = chunk_count(ref.size, ref.chunk_size)
    if len(leaves) != expected:
        raise ProtocolError(f"the hash list has {len(leaves)} hashes; the file has {expected}")
    if any(not isinstance(leaf, bytes) or len(leaf) != HASH_SIZE for leaf in leaves):
        raise ProtocolError(f"a leaf hash is not {HASH_SIZE} bytes")
    if merkle_root(leaves) != ref.root:
        raise ProtocolError("the hash list does not match the file's root")
    return Manifest(ref, tuple(leaves))


class ManifestBuilder:
    """Makes a file's manifest while the sender reads it once, chunk by chunk,
    in order; each :meth:`add` returns that chunk's ciphertext.  It also
    hashes the plaintext: :meth:`sha256` is the digest people compare.

    Values the format cannot carry (a name, a size, a key) are the caller's
    mistake: LocalProtocolError.  Chunks that do not add up to the size the
    file had are the file's doing (it changed while it was read):
    ProtocolError.
    """

    def __init__(self, name: str, size: int, chunk_size: int, key: bytes) -> None:
        _check_key(key)
        try:
            check_geometry(size, chunk_size)
            check_name(name)
        except ProtocolError as error:
            # The same rules a receiver applies; here the caller broke them.
            raise LocalProtocolError(f"the file cannot be sent: {error}") from None
        self._name = name
        self._size = size
        self._chunk_size = chunk_size
        self._key = key
        self._chunks = chunk_count(size, chunk_size)
        self._leaves: list[bytes] = []
        self._plaintext = hashlib.sha256()
        self._sha256: bytes | None = None

    def add(self, plaintext: bytes) -> bytes:
        """Seal the next chunk and record its leaf; the ciphertext comes back."""
        index = len(self._leaves)
        if index == self._chunks:
            raise ProtocolError(f"the file is longer than {self._size} bytes")
        ciphertext = seal_chunk(self._key, self._size, self._chunk_size, index, plaintext)
        self._plaintext.update(plaintext)
        self._leaves.append(leaf_hash(ciphertext))
        return ciphertext

    def finish(self) -> Manifest:
        """The manifest, once every chunk is in.  An empty file's one chunk is
        empty: a read loop that never yields an empty block need not add it."""
        if self._size == 0 and not self._leaves:
            self.add(b"")
        if len(self._leaves) != self._chunks:
            raise ProtocolError(f"the file is shorter than {self._size} bytes")
        self._sha256 = self._plaintext.digest()
        ref = FileRef(merkle_root(self._leaves), self._size, self._chunk_size, self._name)
        return Manifest(ref, tuple(self._leaves))

    def sha256(self) -> bytes:
        """SHA-256 of the whole plaintext, once :meth:`finish` has been called."""
        if self._sha256 is None:
            raise LocalProtocolError("the manifest is not finished")
        return self._sha256
