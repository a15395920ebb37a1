"""The pure part of file transfer: manifests, chunk encryption, the Merkle
tree, file references and their URI, names, and the data-channel messages.

Chunk encryption and the tree are checked against a second implementation
written here from docs/protocol/files.md (AESGCM and hashlib called
directly), and against one frozen vector so the format cannot drift.  Every
decoder of outside input (transfer.wire.decode, parse_uri, the FileOffer and
WebRTCSignal bodies) is fed garbage and edited valid input: a value or
ProtocolError, nothing else, and what it accepts survives a round trip.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.protocol import (
    AppMessage,
    ByeReason,
    DecryptError,
    FileOffer,
    LocalProtocolError,
    ProtocolError,
    SignalType,
    WebRTCSignal,
    fit_reason,
)
from pigeon.protocol.messages import MAX_REASON_BYTES, Kind, check_reason
from pigeon.protocol.wire import Writer, encode_varint
from pigeon.transfer import wire
from pigeon.transfer.manifest import (
    DEFAULT_CHUNK,
    HASH_SIZE,
    KEY_SIZE,
    MAX_CHUNK,
    MAX_CHUNKS,
    MAX_HASHES_PER_PAGE,
    MAX_NAME_BYTES,
    MIN_CHUNK,
    TAG_SIZE,
    Manifest,
    ManifestBuilder,
    check_range,
    chunk_count,
    chunk_length,
    hash_pages,
    leaf_hash,
    merkle_root,
    new_key,
    open_chunk,
    seal_chunk,
    verify_leaves,
)
from pigeon.transfer.reference import MAX_URI_CHARS, FileRef, check_name, parse_uri, safe_name

FILES_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "files.md"
CHUNK_SIZES = [MIN_CHUNK, 32 * 1024, 64 * 1024, MAX_CHUNK]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_LESS = settings(FUZZ, max_examples=60)


def rng(seed: str) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def outcome(decode: Callable[[object], object], data: object) -> object:
    """The decoder's result, or the ProtocolError it raised (in one printable
    line); any other exception fails the test."""
    try:
        return decode(data)
    except ProtocolError as error:
        text = str(error)
        assert text and text.isprintable() and text == text.strip(), repr(text)
        return error
    except Exception as error:
        raise AssertionError(f"raised {type(error).__name__}({error}) for {data!r:.300}") from error


def refused(decode: Callable[[object], object], data: object) -> ProtocolError:
    result = outcome(decode, data)
    assert isinstance(result, ProtocolError), f"accepted {result!r:.300}"
    return result


# -- a second implementation, from the text of files.md -----------------------------


def spec_seal(key: bytes, size: int, chunk_size: int, index: int, plaintext: bytes) -> bytes:
    nonce = struct.pack(">IQ", 0, index)
    aad = b"pigeon/file-chunk/v1" + struct.pack(">QIQ", size, chunk_size, index)
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def spec_root(leaves: list[bytes]) -> bytes:
    """Pad the leaf layer with zero hashes to a power of two, then hash pairs."""
    width = 1
    while width < len(leaves):
        width *= 2
    layer = leaves + [bytes(32)] * (width - len(leaves))
    while len(layer) > 1:
        layer = [
            hashlib.sha256(b"\x01" + layer[i] + layer[i + 1]).digest()
            for i in range(0, len(layer), 2)
        ]
    return layer[0]


def spec_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def build(data: bytes, chunk_size: int, key: bytes, name: str = "f.bin") -> tuple[Manifest, bytes]:
    """Through the builder: the manifest and the ciphertexts' concatenation."""
    builder = ManifestBuilder(name, len(data), chunk_size, key)
    sealed = b"".join(builder.add(chunk) for chunk in spec_chunks(data, chunk_size))
    manifest = builder.finish()
    assert builder.sha256() == hashlib.sha256(data).digest()
    return manifest, sealed


# -- chunk geometry -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "count", "last"),
    [
        (0, 1, 0),
        (1, 1, 1),
        (MIN_CHUNK - 1, 1, MIN_CHUNK - 1),
        (MIN_CHUNK, 1, MIN_CHUNK),
        (MIN_CHUNK + 1, 2, 1),
        (5 * MIN_CHUNK, 5, MIN_CHUNK),
        (MIN_CHUNK * MAX_CHUNKS, MAX_CHUNKS, MIN_CHUNK),
    ],
)
def test_chunk_count_and_lengths(size, count, last):
    assert chunk_count(size, MIN_CHUNK) == count
    assert chunk_length(size, MIN_CHUNK, count - 1) == last
    assert all(chunk_length(size, MIN_CHUNK, i) == MIN_CHUNK for i in range(min(count - 1, 3)))
    refused(lambda i: chunk_length(size, MIN_CHUNK, i), count)
    refused(lambda i: chunk_length(size, MIN_CHUNK, i), -1)


# -- manifests: round trips against the second implementation ------------------------

SIZES = [0, 1, MIN_CHUNK - 1, MIN_CHUNK, MIN_CHUNK + 1, 3 * MIN_CHUNK, 5 * MIN_CHUNK + 7]


@pytest.mark.parametrize("size", SIZES)
def test_manifest_round_trip(size):
    key = rng(f"key {size}")(KEY_SIZE)
    data = rng(f"file {size}")(size)
    manifest, sealed = build(data, MIN_CHUNK, key)
    chunks = spec_chunks(data, MIN_CHUNK)
    ciphertexts = [spec_seal(key, size, MIN_CHUNK, i, c) for i, c in enumerate(chunks)]
    assert sealed == b"".join(ciphertexts)
    leaves = [hashlib.sha256(b"\x00" + c).digest() for c in ciphertexts]
    assert list(manifest.leaves) == leaves
    assert manifest.ref == FileRef(spec_root(leaves), size, MIN_CHUNK, "f.bin")
    # The receiver: the reference from the URI, the leaves from the sender.
    ref = parse_uri(manifest.ref.to_uri())
    assert verify_leaves(ref, leaves) == manifest
    opened = b""
    for i, ciphertext in enumerate(ciphertexts):
        manifest.verify_chunk(i, ciphertext)
        opened += open_chunk(key, size, MIN_CHUNK, i, ciphertext)
    assert opened == data


def test_a_file_at_the_default_chunk_size():
    key = rng("default key")(KEY_SIZE)
    data = rng("default file")(2 * DEFAULT_CHUNK + 100)
    manifest, sealed = build(data, DEFAULT_CHUNK, key)
    assert manifest.ref.chunk_size == DEFAULT_CHUNK == MAX_CHUNK
    assert len(manifest.leaves) == 3
    assert len(sealed) == len(data) + 3 * TAG_SIZE


def test_frozen_vector():
    """Made once with the second implementation above; a change of format
    (nonce, associated data, tree, URI) breaks it."""
    data = bytes(i % 251 for i in range(40000))
    manifest, _ = build(data, MIN_CHUNK, bytes(range(32)), "vector.bin")
    assert manifest.ref.to_uri() == (
        "pigeon-file:?v=1&root=230535e23615324ae019b702a57494c1c56d1f78bb22b5b8afe8aa4b647a4319"
        "&size=40000&chunk=16384&name=vector.bin"
    )
    assert hashlib.sha256(data).hexdigest() == (
        "8f272ca6d96caedf3d860ff34ed21868f04ce18a2f41686f513c3c989146ca79"
    )


@FUZZ
@given(leaves=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70))
def test_merkle_root_matches_the_plain_tree(leaves):
    assert merkle_root(leaves) == spec_root(leaves)


@pytest.mark.parametrize("count", [1, 2, 3, 1023, 1024, 1025, 2049])
def test_merkle_root_of_larger_trees(count):
    leaves = [rng(f"leaf {count} {i}")(32) for i in range(count)]
    assert merkle_root(leaves) == spec_root(leaves)


def test_a_tree_needs_a_leaf():
    with pytest.raises(LocalProtocolError):
        merkle_root([])


def test_leaves_and_nodes_cannot_pass_for_each_other():
    # Without the 0x00 / 0x01 prefixes, a 64-byte chunk equal to two leaf
    # hashes side by side would hash to their parent.
    a, b = rng("a")(32), rng("b")(32)
    parent = merkle_root([a, b])
    assert leaf_hash(a + b) != parent
    assert hashlib.sha256(b"\x01" + a + b).digest() == parent


def test_encryption_is_deterministic_and_bound_to_the_key():
    key, other = rng("k1")(32), rng("k2")(32)
    plaintext = rng("p")(MIN_CHUNK)
    first = seal_chunk(key, 3 * MIN_CHUNK, MIN_CHUNK, 1, plaintext)
    assert seal_chunk(key, 3 * MIN_CHUNK, MIN_CHUNK, 1, plaintext) == first
    assert seal_chunk(other, 3 * MIN_CHUNK, MIN_CHUNK, 1, plaintext) != first
    assert first == spec_seal(key, 3 * MIN_CHUNK, MIN_CHUNK, 1, plaintext)


# -- tampering ------------------------------------------------------------------------

KEY = rng("tamper key")(KEY_SIZE)
DATA = rng("tamper file")(2 * MIN_CHUNK + 20)  # two full chunks and one of 20 bytes
MANIFEST, SEALED = build(DATA, MIN_CHUNK, KEY)
CIPHERTEXTS = [SEALED[:16400], SEALED[16400:32800], SEALED[32800:]]
SIZE = len(DATA)


def test_every_bit_of_a_chunk_is_checked():
    """Each bit of the short last chunk (ciphertext and tag) flipped in turn:
    its leaf no longer matches and it no longer opens."""
    ciphertext = CIPHERTEXTS[2]
    assert len(ciphertext) == 20 + TAG_SIZE
    for bit in range(len(ciphertext) * 8):
        flipped = bytearray(ciphertext)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert leaf_hash(bytes(flipped)) != MANIFEST.leaves[2]
        with pytest.raises(ProtocolError):
            MANIFEST.verify_chunk(2, bytes(flipped))
        with pytest.raises(DecryptError):
            open_chunk(KEY, SIZE, MIN_CHUNK, 2, bytes(flipped))


@FUZZ_LESS
@given(chunk=st.integers(0, 1), bit=st.integers(0, (MIN_CHUNK + TAG_SIZE) * 8 - 1))
def test_any_bit_of_a_full_chunk_is_checked(chunk, bit):
    flipped = bytearray(CIPHERTEXTS[chunk])
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        MANIFEST.verify_chunk(chunk, bytes(flipped))
    with pytest.raises(DecryptError):
        open_chunk(KEY, SIZE, MIN_CHUNK, chunk, bytes(flipped))


def test_a_chunk_opens_only_at_its_own_place():
    with pytest.raises(DecryptError):
        open_chunk(KEY, SIZE, MIN_CHUNK, 1, CIPHERTEXTS[0])  # wrong index
    with pytest.raises(DecryptError):
        open_chunk(KEY, SIZE + 1, MIN_CHUNK, 0, CIPHERTEXTS[0])  # another file's size
    with pytest.raises(DecryptError):
        open_chunk(rng("other")(32), SIZE, MIN_CHUNK, 0, CIPHERTEXTS[0])  # another key
    for index, ciphertext in [(0, CIPHERTEXTS[1]), (1, CIPHERTEXTS[0])]:  # swapped
        with pytest.raises(ProtocolError):
            MANIFEST.verify_chunk(index, ciphertext)


def test_a_chunk_of_the_wrong_length_is_refused_before_decryption():
    for ciphertext in [CIPHERTEXTS[0][:-1], CIPHERTEXTS[0] + b"\x00", CIPHERTEXTS[2][:16], b""]:
        error = refused(lambda c: open_chunk(KEY, SIZE, MIN_CHUNK, 2, c), ciphertext)
        assert not isinstance(error, DecryptError) or ciphertext == CIPHERTEXTS[2][:16]
    refused(lambda c: MANIFEST.verify_chunk(3, c), CIPHERTEXTS[2])
    refused(lambda c: open_chunk(KEY, SIZE, MIN_CHUNK, 3, c), CIPHERTEXTS[2])


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_hash_list_with_one_wrong_hash_is_refused(position):
    for bit in (0, 7, 255):
        leaves = list(MANIFEST.leaves)
        wrong = bytearray(leaves[position])
        wrong[bit // 8] ^= 1 << (bit % 8)
        leaves[position] = bytes(wrong)
        refused(lambda ls: verify_leaves(MANIFEST.ref, ls), leaves)


def test_a_hash_list_of_the_wrong_count_is_refused():
    leaves = list(MANIFEST.leaves)
    # Three leaves and a padding hash have the same root as the three alone:
    # only the count tells them apart.
    padded = [*leaves, bytes(HASH_SIZE)]
    assert merkle_root(padded) == MANIFEST.ref.root
    for wrong in (padded, leaves[:2], [*leaves, leaves[0]], []):
        refused(lambda ls: verify_leaves(MANIFEST.ref, ls), wrong)
    refused(lambda ls: verify_leaves(MANIFEST.ref, ls), [*leaves[:2], leaves[2] + b"\x00"])
    refused(lambda ls: verify_leaves(MANIFEST.ref, ls), leaves[::-1])


def test_a_tampered_root_names_another_file():
    uri = MANIFEST.ref.to_uri()
    digit = uri.index("root=") + 5
    other = uri[:digit] + ("1" if uri[digit] == "0" else "0") + uri[digit + 1 :]
    ref = parse_uri(other)
    assert ref != MANIFEST.ref
    refused(lambda ls: verify_leaves(ref, ls), MANIFEST.leaves)


# -- the builder and keys -------------------------------------------------------------


def test_builder_refuses_values_the_format_cannot_carry():
    key = rng("k")(KEY_SIZE)
    for name, size, chunk_size, bad_key in [
        ("", 1, MIN_CHUNK, key),
        ("a/b", 1, MIN_CHUNK, key),
        ("a", MIN_CHUNK * MAX_CHUNKS + 1, MIN_CHUNK, key),
        ("a", -1, MIN_CHUNK, key),
        ("a", 1, MIN_CHUNK + 1, key),
        ("a", 1, 2 * MAX_CHUNK, key),
        ("a", 1, MIN_CHUNK, key[:-1]),
    ]:
        with pytest.raises(LocalProtocolError):
            ManifestBuilder(name, size, chunk_size, bad_key)
    with pytest.raises(LocalProtocolError, match="not finished"):
        ManifestBuilder("a", 1, MIN_CHUNK, key).sha256()


def test_builder_refuses_a_file_that_changed_while_read():
    """Chunks that do not add up to the size taken before: ProtocolError."""
    key = rng("k")(KEY_SIZE)
    builder = ManifestBuilder("a", MIN_CHUNK + 1, MIN_CHUNK, key)
    with pytest.raises(ProtocolError):
        builder.add(bytes(MIN_CHUNK - 1))  # the first chunk is a full one
    builder.add(bytes(MIN_CHUNK))
    with pytest.raises(ProtocolError):
        builder.finish()  # one chunk missing: the file shrank
    with pytest.raises(ProtocolError):
        builder.add(bytes(2))  # the last chunk is 1 byte
    builder.add(b"x")
    with pytest.raises(ProtocolError):
        builder.add(b"")  # no chunk after the last: the file grew
    assert builder.finish().ref.size == MIN_CHUNK + 1
    shrunk = ManifestBuilder("a", 5, MIN_CHUNK, key)
    with pytest.raises(ProtocolError):
        shrunk.finish()


def test_an_empty_file_needs_no_chunk_added():
    """A read loop (``while block := f.read(n)``) never yields the empty chunk."""
    key = rng("k")(KEY_SIZE)
    builder = ManifestBuilder("empty", 0, MIN_CHUNK, key)
    manifest = builder.finish()
    assert manifest == build(b"", MIN_CHUNK, key, "empty")[0]
    assert builder.sha256() == hashlib.sha256(b"").digest()
    assert manifest.leaves == (leaf_hash(spec_seal(key, 0, MIN_CHUNK, 0, b"")),)


def test_the_largest_file_is_accepted():
    ref = FileRef(bytes(32), MIN_CHUNK * MAX_CHUNKS, MIN_CHUNK, "big")
    assert chunk_count(ref.size, ref.chunk_size) == MAX_CHUNKS
    ManifestBuilder("big", MAX_CHUNK * MAX_CHUNKS, MAX_CHUNK, bytes(32))


def test_new_key_uses_the_randomness_given():
    assert new_key(rng("fixed")) == rng("fixed")(KEY_SIZE)
    with pytest.raises(LocalProtocolError):
        new_key(lambda n: bytes(n - 1))


# -- hash-list pages ------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [1, 2, 2047, 2048, 2049, 4096, 5000, MAX_CHUNKS])
def test_hash_pages_cover_the_list_once(chunks):
    pages = hash_pages(chunks)
    assert pages[0][0] == 0
    assert all(1 <= count <= MAX_HASHES_PER_PAGE for _, count in pages)
    assert all(count == MAX_HASHES_PER_PAGE for _, count in pages[:-1])
    ends = [start + count for start, count in pages]
    assert [start for start, _ in pages[1:]] == ends[:-1]
    assert ends[-1] == chunks
    for start, count in pages:
        check_range(start, count, chunks, MAX_HASHES_PER_PAGE)


def test_a_page_of_the_manifest():
    assert MANIFEST.page(0, 3) == MANIFEST.leaves
    assert MANIFEST.page(1, 2) == MANIFEST.leaves[1:]
    for start, count in [(0, 0), (0, 4), (1, 3), (3, 1), (-1, 1), (0, MAX_HASHES_PER_PAGE + 1)]:
        refused(lambda s, count=count: MANIFEST.page(s, count), start)


def test_check_range():
    check_range(0, 1, 1, 1)
    check_range(10, 256, 266, 256)
    for start, count, total, limit in [(0, 0, 5, 5), (0, 6, 10, 5), (5, 1, 5, 5), (-1, 2, 5, 5)]:
        refused(lambda s, c=count, t=total, n=limit: check_range(s, c, t, n), start)


# -- file references: the URI -------------------------------------------------------

REF = FileRef(bytes(range(32)), 5 * MAX_CHUNK + 3, MAX_CHUNK, "photo 🐦 (1).jpg")
URI = REF.to_uri()


def test_uri_layout():
    assert URI == (
        "pigeon-file:?v=1&root=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "&size=655363&chunk=131072&name=photo%20%F0%9F%90%A6%20%281%29.jpg"
    )
    assert parse_uri(URI) == REF


def test_the_example_in_the_docs_parses():
    examples = re.findall(r"pigeon-file:\?v=1&root=[0-9a-f]{64}\S*", FILES_MD.read_text())
    assert URI in examples
    for example in examples:
        assert parse_uri(example).to_uri() == example


NAMES = st.text(st.characters(exclude_categories=()), min_size=0, max_size=300).map(safe_name)


@FUZZ
@given(
    root=st.binary(min_size=32, max_size=32),
    chunk_size=st.sampled_from(CHUNK_SIZES),
    chunks=st.integers(0, MAX_CHUNKS),
    extra=st.integers(0, 3),
    name=NAMES,
)
def test_uri_round_trip(root, chunk_size, chunks, extra, name):
    size = max(0, min(chunks * chunk_size - extra, chunk_size * MAX_CHUNKS))
    ref = FileRef(root, size, chunk_size, name)
    uri = ref.to_uri()
    assert len(uri) <= MAX_URI_CHARS
    assert uri.isascii() and uri.isprintable()
    assert parse_uri(uri) == ref


def edit(uri: str, old: str, new: str) -> str:
    assert old in uri, old
    return uri.replace(old, new, 1)


ROOT_HEX = REF.root.hex()
STRICT_REFUSALS = {
    "another scheme": edit(URI, "pigeon-file:", "pigeon:"),
    "uppercase scheme": edit(URI, "pigeon-file:", "PIGEON-FILE:"),
    "an authority": edit(URI, "pigeon-file:?", "pigeon-file://?"),
    "no '?'": edit(URI, "pigeon-file:?", "pigeon-file:"),
    "a leading space": " " + URI,
    "a trailing newline": URI + "\n",
    "a fragment": URI + "#x",
    "longer than 4096 characters": URI + "&x=" + "a" * MAX_URI_CHARS,
    "empty": "",
    "version 2": edit(URI, "v=1", "v=2"),
    "version 01": edit(URI, "v=1", "v=01"),
    "no version": edit(URI, "v=1&", ""),
    "a duplicate key": URI + "&size=655363",
    "a duplicate version": edit(URI, "v=1&", "v=1&v=1&"),
    "an unknown key": URI + "&x=1",
    "an empty field": URI + "&",
    "a field without '='": edit(URI, "&name=", "&name"),
    "no root": edit(URI, f"root={ROOT_HEX}&", ""),
    "no size": edit(URI, "size=655363&", ""),
    "no chunk": edit(URI, "chunk=131072&", ""),
    "no name": URI[: URI.index("&name=")],
    "keys out of order": edit(URI, "size=655363&chunk=131072", "chunk=131072&size=655363"),
    "an uppercase root": edit(URI, ROOT_HEX, ROOT_HEX.upper()),
    "a short root": edit(URI, ROOT_HEX, ROOT_HEX[:-1]),
    "a long root": edit(URI, ROOT_HEX, ROOT_HEX + "0"),
    "a root with a non-hex digit": edit(URI, ROOT_HEX, "g" + ROOT_HEX[1:]),
    "a signed size": edit(URI, "size=655363", "size=+655363"),
    "a negative size": edit(URI, "size=655363", "size=-655363"),
    "a size with a leading zero": edit(URI, "size=655363", "size=0655363"),
    "an empty size": edit(URI, "size=655363", "size="),
    "a size with a fraction": edit(URI, "size=655363", "size=655363.0"),
    "a size in hex": edit(URI, "size=655363", "size=0x10"),
    "a size with an exponent": edit(URI, "size=655363", "size=1e3"),
    "a size in Arabic-Indic digits": edit(URI, "size=655363", "size=\u0665"),
    "a huge size": edit(URI, "size=655363", "size=" + "9" * 30),
    "a size past the largest file": edit(URI, "size=655363", f"size={MAX_CHUNK * MAX_CHUNKS + 1}"),
    "a chunk of 0": edit(URI, "chunk=131072", "chunk=0"),
    "a chunk with a leading zero": edit(URI, "chunk=131072", "chunk=0131072"),
    "a chunk below the minimum": edit(URI, "chunk=131072", "chunk=8192"),
    "a chunk above the maximum": edit(URI, "chunk=131072", "chunk=262144"),
    "a chunk that is not a power of two": edit(URI, "chunk=131072", "chunk=98304"),
    "an empty name": URI[: URI.index("&name=")] + "&name=",
    "the name '.'": URI[: URI.index("&name=")] + "&name=.",
    "the name '..'": URI[: URI.index("&name=")] + "&name=..",
    "a name climbing out": URI[: URI.index("&name=")] + "&name=..%2Fetc%2Fpasswd",
    "a name with a slash": URI[: URI.index("&name=")] + "&name=a%2Fb",
    "a name with a backslash": URI[: URI.index("&name=")] + "&name=a%5Cb",
    "a name with NUL": URI[: URI.index("&name=")] + "&name=a%00b",
    "a name with a C0 control": URI[: URI.index("&name=")] + "&name=a%1Fb",
    "a name with a newline": URI[: URI.index("&name=")] + "&name=a%0Ab",
    "a name with DEL": URI[: URI.index("&name=")] + "&name=a%7Fb",
    "a name with a C1 control": URI[: URI.index("&name=")] + "&name=a%C2%85b",
    "a name with a right-to-left override": URI[: URI.index("&name=")] + "&name=a%E2%80%AEb",
    "a name with a direction isolate": URI[: URI.index("&name=")] + "&name=a%E2%81%A6b",
    "a name with a direction mark": URI[: URI.index("&name=")] + "&name=a%E2%80%8Fb",
    "a name with a line separator": URI[: URI.index("&name=")] + "&name=a%E2%80%A8b",
    "a name with a leading space": URI[: URI.index("&name=")] + "&name=%20a",
    "a name with a trailing space": URI[: URI.index("&name=")] + "&name=a%20",
    "a name of 256 bytes": URI[: URI.index("&name=")] + "&name=" + "a" * 256,
    "a name that is not UTF-8": URI[: URI.index("&name=")] + "&name=a%FF",
    "a name with an overlong encoding": URI[: URI.index("&name=")] + "&name=%C0%AF",
    "a name with an encoded surrogate": URI[: URI.index("&name=")] + "&name=%ED%B2%80",
    "a name with lowercase escapes": edit(URI, "%F0%9F%90%A6", "%f0%9f%90%a6"),
    "a name with an escaped letter": edit(URI, "photo", "%70hoto"),
    "a name with '+' for a space": edit(URI, "photo%20", "photo+"),
    "a name with a raw space": edit(URI, "photo%20", "photo "),
    "a name with a raw non-ASCII character": edit(URI, "%F0%9F%90%A6", "\U0001f426"),
    "a name with a broken escape": edit(URI, "%20", "%2"),
    "a name with a bad escape": edit(URI, "%20", "%zz"),
}


@pytest.mark.parametrize("case", sorted(STRICT_REFUSALS))
def test_parse_uri_is_strict(case):
    refused(parse_uri, STRICT_REFUSALS[case])


def test_a_uri_is_measured_before_it_is_read():
    # No valid reference is this long (a name is at most 765 characters
    # encoded): the limit keeps a huge paste from being parsed at all.
    error = refused(parse_uri, "pigeon-file:?v=1&root=" + "0" * MAX_URI_CHARS)
    assert str(error) == f"file reference is longer than {MAX_URI_CHARS} characters"


def test_parse_uri_refuses_what_is_not_text():
    refused(parse_uri, URI.encode())
    refused(parse_uri, None)


def test_the_boundaries_are_accepted():
    for value in [f"size={MAX_CHUNK * MAX_CHUNKS}", "size=0"]:
        assert parse_uri(edit(URI, "size=655363", value))
    for chunk in CHUNK_SIZES:
        assert parse_uri(edit(URI, "chunk=131072", f"chunk={chunk}")).chunk_size == chunk
    longest = URI[: URI.index("&name=")] + "&name=" + "%C3%A9" * (MAX_NAME_BYTES // 2) + "a"
    assert len(parse_uri(longest).name.encode()) == MAX_NAME_BYTES


# -- names -----------------------------------------------------------------------------

FORBIDDEN_IN_NAMES = [
    *"/\\\x00\x01\x1f\x7f\x80\x85\x9f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
    *"\u200e\u200f\u2028\u2029",
    "\udcff",
]


@pytest.mark.parametrize("char", FORBIDDEN_IN_NAMES, ids=lambda c: f"U+{ord(c):04X}")
def test_names_refuse_the_forbidden_characters(char):
    refused(check_name, f"a{char}b")
    refused(check_name, char)
    assert check_name(safe_name(f"a{char}b")) is None


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", " a", "a ", "\u00a0a", "a\u3000", "\ta", "a" * (MAX_NAME_BYTES + 1)],
)
def test_names_refused(name):
    refused(check_name, name)


@pytest.mark.parametrize(
    "name",
    [
        "photo 🐦.jpg",
        "👩\u200d👩\u200d👧.png",  # joined by zero-width joiners: allowed
        "...",
        ".hidden",
        "a.b.c",
        "Résumé \u2013 final.pdf",
        "a" * MAX_NAME_BYTES,
        "é" * (MAX_NAME_BYTES // 2),
        "CON",  # Windows cannot hold it; receivers on Windows pick another path
    ],
)
def test_names_accepted(name):
    check_name(name)
    assert safe_name(name) == name


@pytest.mark.parametrize(
    ("local", "sent"),
    [
        ("../../etc/passwd", ".._.._etc_passwd"),
        ("C:\\Users\\me\\notes.txt", "C:_Users_me_notes.txt"),
        ("  report.pdf \n", "report.pdf"),
        ("invoice\u202efdp.exe", "invoice_fdp.exe"),
        ("", "file"),
        ("   ", "file"),
        (".", "file"),
        ("..", "file"),
        ("/", "_"),
        ("bad\udcffbytes.txt", "bad_bytes.txt"),
    ],
)
def test_safe_name_examples(local, sent):
    assert safe_name(local) == sent


def test_safe_name_keeps_the_extension_of_a_long_name():
    name = safe_name("é" * 300 + ".tar.gz")
    assert name.endswith(".gz") and len(name.encode()) <= MAX_NAME_BYTES
    assert len(name.encode()) >= MAX_NAME_BYTES - 1  # cut on a character boundary
    long_extension = safe_name("a" * 300 + "." + "b" * 40)
    assert long_extension == "a" * MAX_NAME_BYTES
    wide_extension = safe_name("a" * 300 + ".ñé")  # the budget is counted in bytes
    assert wide_extension == "a" * (MAX_NAME_BYTES - 5) + ".ñé"


@FUZZ
@given(name=st.text(st.characters(exclude_categories=()), max_size=400))
def test_safe_name_always_gives_a_valid_name(name):
    sent = safe_name(name)
    check_name(sent)
    assert safe_name(sent) == sent
    if not isinstance(outcome(check_name, name), ProtocolError):
        assert sent == name


# -- fuzzing parse_uri ------------------------------------------------------------------

URI_PIECES = st.sampled_from(
    [
        *("&", "=", "%", "%2", "%20", "%2F", "%00", "%C3", "%e2%80%ae", "%FF", "+", "#", "?"),
        *("v=1", "root=", "size=", "chunk=", "name=", "0", "1", "9", "-", ".", "/", "\\"),
        *(" ", "\n", "\u00e9", "\u202e", "\udcff", "a", "F", "x"),
    ]
)
ANY_CHAR = st.characters(exclude_categories=())
TEXT_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete"]), st.integers(0, 2**16), URI_PIECES | ANY_CHAR
    ),
    min_size=1,
    max_size=4,
)


def edit_text(text: str, edits: list[tuple[str, int, str]]) -> str:
    chars = list(text)
    for op, where, value in edits:
        if op == "insert":
            chars.insert(where % (len(chars) + 1), value)
        elif chars:
            i = where % len(chars)
            if op == "set":
                chars[i] = value
            else:
                del chars[i]
    return "".join(chars)


@FUZZ
@given(
    text=st.one_of(
        st.text(ANY_CHAR, max_size=300),
        st.lists(URI_PIECES, max_size=30).map(lambda p: "pigeon-file:?" + "".join(p)),
        TEXT_EDITS.map(lambda e: edit_text(URI, e)),
    )
)
def test_parse_uri_fuzz(text):
    """Garbage and edited URIs: a ProtocolError, or a reference whose URI is
    exactly the text (parsing is canonical)."""
    ref = outcome(parse_uri, text)
    if not isinstance(ref, ProtocolError):
        assert isinstance(ref, FileRef)
        assert ref.to_uri() == text


# -- the data-channel messages ----------------------------------------------------------

TRANSFER_ID = rng("transfer")(16)
HASHES = tuple(rng(f"h{i}")(32) for i in range(5))
MESSAGES: list[wire.Message] = [
    wire.Hello(TRANSFER_ID),
    wire.WantHashes(0, 1),
    wire.WantHashes(4096, MAX_HASHES_PER_PAGE),
    wire.Hashes(0, HASHES),
    wire.Hashes(MAX_CHUNKS - 5, HASHES),
    wire.Want(0, 1),
    wire.Want(300, wire.MAX_WANT),
    wire.Chunk(0, bytes(TAG_SIZE)),
    wire.Chunk(MAX_CHUNKS - 1, rng("c")(MAX_CHUNK + TAG_SIZE)),
    wire.Ping(0),
    wire.Ping(2**64 - 1),
    wire.Done(),
    wire.Error(wire.ErrorCode.CANCELLED),
    wire.Error(wire.ErrorCode.FILE_CHANGED, "the file changed ✂"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_wire_round_trip(message):
    data = message.encode()
    assert data[0] == wire.MessageType[_type_name(message)]
    assert len(data) <= wire.MAX_MESSAGE
    assert wire.decode(data) == message


def _type_name(message: wire.Message) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(message).__name__).upper()


def test_type_bytes_and_codes_are_the_documented_ones():
    assert {t.name: t.value for t in wire.MessageType} == {
        "HELLO": 1,
        "WANT_HASHES": 2,
        "HASHES": 3,
        "WANT": 4,
        "CHUNK": 5,
        "PING": 6,
        "DONE": 7,
        "ERROR": 8,
    }
    assert {c.name: c.value for c in wire.ErrorCode} == {
        "CANCELLED": 1,
        "REFUSED": 2,
        "FAILED": 3,
        "FILE_CHANGED": 4,
        "UNKNOWN_TRANSFER": 5,
        "PROTOCOL": 6,
    }
    assert wire.Want(3, 4).encode() == b"\x04\x08\x03\x10\x04"
    assert wire.Hello(bytes(16)).encode() == b"\x01\x0a\x10" + bytes(16) + b"\x10\x01"
    assert wire.Done().encode() == b"\x07"


def test_chunk_layout():
    assert wire.Chunk(0x0F0304, b"c" * 20).encode() == b"\x05\x00\x0f\x03\x04" + b"c" * 20


def test_the_largest_messages_fit_a_data_channel_message():
    largest = [
        wire.Chunk(MAX_CHUNKS - 1, bytes(MAX_CHUNK + TAG_SIZE)),
        wire.Hashes(MAX_CHUNKS - MAX_HASHES_PER_PAGE, (bytes(32),) * MAX_HASHES_PER_PAGE),
        wire.Error(wire.ErrorCode.PROTOCOL, "é" * (wire.MAX_ERROR_TEXT // 2)),
    ]
    sizes = [len(m.encode()) for m in largest]
    assert max(sizes) == wire.MAX_MESSAGE == sizes[0] <= 262_144
    # type byte, start (key and 3 bytes), hashes (key and a 3-byte length), a full page
    assert sizes[1] == 1 + 4 + 4 + MAX_HASHES_PER_PAGE * HASH_SIZE


@FUZZ
@given(
    start=st.integers(0, MAX_CHUNKS - 1),
    count=st.integers(1, MAX_HASHES_PER_PAGE),
    sequence=st.integers(0, 2**64 - 1),
    index=st.integers(0, MAX_CHUNKS - 1),
    ciphertext=st.binary(min_size=TAG_SIZE, max_size=300),
    text=st.text(max_size=80).map(fit_reason),
    code=st.sampled_from(wire.ErrorCode),
)
def test_wire_round_trip_property(start, count, sequence, index, ciphertext, text, code):
    start = min(start, MAX_CHUNKS - count)
    want = min(count, wire.MAX_WANT)
    hashes = tuple(bytes([i % 256]) * 32 for i in range(count))
    for message in [
        wire.WantHashes(start, count),
        wire.Hashes(start, hashes),
        wire.Want(min(start, MAX_CHUNKS - want), want),
        wire.Chunk(index, ciphertext),
        wire.Ping(sequence),
        wire.Error(code, text),
    ]:
        assert wire.decode(message.encode()) == message


def body(kind: wire.MessageType, writer: Writer) -> bytes:
    return bytes([kind]) + writer.finish()


T = wire.MessageType
WIRE_REFUSALS = {
    "empty": b"",
    "type 0": b"\x00",
    "type 9": b"\x09\x08\x01",
    "type 255": b"\xff",
    "longer than any message": b"\x05" + bytes(wire.MAX_MESSAGE),
    "hello without a version": body(T.HELLO, Writer().bytes_(1, TRANSFER_ID)),
    "hello of version 2": body(T.HELLO, Writer().bytes_(1, TRANSFER_ID).uint(2, 2)),
    "hello of version 0": body(
        T.HELLO, Writer().bytes_(1, TRANSFER_ID).uint(2, 0, skip_zero=False)
    ),
    "hello with a short ID": body(T.HELLO, Writer().bytes_(1, TRANSFER_ID[:15]).uint(2, 1)),
    "hello without an ID": body(T.HELLO, Writer().uint(2, 1)),
    "hello with two IDs": body(
        T.HELLO, Writer().bytes_(1, TRANSFER_ID).bytes_(1, TRANSFER_ID).uint(2, 1)
    ),
    "want_hashes of 0": body(T.WANT_HASHES, Writer().uint(1, 5)),
    "want_hashes of 2049": body(T.WANT_HASHES, Writer().uint(2, MAX_HASHES_PER_PAGE + 1)),
    "want_hashes past 2^20": body(T.WANT_HASHES, Writer().uint(1, MAX_CHUNKS - 1).uint(2, 2)),
    "want_hashes with a start of 2^64": body(T.WANT_HASHES, Writer().uint(1, 2**64 - 1).uint(2, 1)),
    "want_hashes with a count as bytes": body(T.WANT_HASHES, Writer().bytes_(2, b"\x01")),
    "hashes without hashes": body(T.HASHES, Writer().uint(1, 3)),
    "hashes of 31 bytes": body(T.HASHES, Writer().bytes_(2, bytes(31))),
    "hashes of 33 bytes": body(T.HASHES, Writer().bytes_(2, bytes(33))),
    "hashes, 2049 of them": body(T.HASHES, Writer().bytes_(2, bytes(32 * 2049))),
    "hashes past 2^20": body(T.HASHES, Writer().uint(1, MAX_CHUNKS - 1).bytes_(2, bytes(64))),
    "want of 0": body(T.WANT, Writer().uint(1, 5)),
    "want of 257": body(T.WANT, Writer().uint(2, wire.MAX_WANT + 1)),
    "want past 2^20": body(T.WANT, Writer().uint(1, MAX_CHUNKS).uint(2, 1)),
    "chunk with no index": b"\x05\x00\x00",
    "chunk shorter than a tag": b"\x05" + bytes(4) + bytes(TAG_SIZE - 1),
    "chunk longer than the largest": b"\x05" + bytes(4) + bytes(MAX_CHUNK + TAG_SIZE + 1),
    "chunk index 2^20": b"\x05" + MAX_CHUNKS.to_bytes(4, "big") + bytes(TAG_SIZE),
    "chunk index 2^32 - 1": b"\x05\xff\xff\xff\xff" + bytes(TAG_SIZE),
    "ping with a sequence as bytes": body(T.PING, Writer().bytes_(1, b"x")),
    "ping with two sequences": body(T.PING, Writer().uint(1, 1).uint(1, 2)),
    "ping with a 65-bit sequence": b"\x06\x08" + b"\xff" * 9 + b"\x02",
    "done with a broken body": b"\x07\xff",
    "done with a truncated field": b"\x07\x0a\x05ab",
    "error without a code": body(T.ERROR, Writer().text(2, "x")),
    "error of code 7": body(T.ERROR, Writer().uint(1, 7)),
    "error of code 2^64 - 1": body(T.ERROR, Writer().uint(1, 2**64 - 1)),
    "error text of 201 bytes": body(T.ERROR, Writer().uint(1, 3).text(2, "x" * 201)),
    "error text of two lines": body(T.ERROR, Writer().uint(1, 3).text(2, "a\nb")),
    "error text with a direction override": body(T.ERROR, Writer().uint(1, 3).text(2, "a\u202e")),
    "error text that is not UTF-8": body(T.ERROR, Writer().uint(1, 3).bytes_(2, b"\xff")),
    "a wire type the codec does not read": b"\x06\x09" + bytes(8),
    "a truncated varint": b"\x04\x08\x80",
}


@pytest.mark.parametrize("case", sorted(WIRE_REFUSALS))
def test_wire_decode_is_strict(case):
    refused(wire.decode, WIRE_REFUSALS[case])


@pytest.mark.parametrize("data", ["\x07", bytearray(b"\x07"), memoryview(b"\x07"), None, 7])
def test_wire_decode_takes_only_bytes(data):
    refused(wire.decode, data)


def test_unknown_fields_are_skipped():
    future = body(T.WANT, Writer().uint(1, 3).uint(2, 4).text(9, "from a newer version"))
    assert wire.decode(future) == wire.Want(3, 4)
    assert wire.decode(b"\x07" + encode_varint(9 << 3) + b"\x01") == wire.Done()


def test_messages_that_break_a_rule_cannot_be_made():
    for make in [
        lambda: wire.Hello(TRANSFER_ID[:-1]),
        lambda: wire.Hello(TRANSFER_ID, 2),
        lambda: wire.WantHashes(0, 0),
        lambda: wire.WantHashes(MAX_CHUNKS - 1, 2),
        lambda: wire.Hashes(0, ()),
        lambda: wire.Hashes(0, (bytes(31),)),
        lambda: wire.Hashes(0, (bytes(32),) * (MAX_HASHES_PER_PAGE + 1)),
        lambda: wire.Want(-1, 1),
        lambda: wire.Want(0, wire.MAX_WANT + 1),
        lambda: wire.Chunk(MAX_CHUNKS, bytes(TAG_SIZE)),
        lambda: wire.Chunk(0, bytes(TAG_SIZE - 1)),
        lambda: wire.Chunk(0, bytes(MAX_CHUNK + TAG_SIZE + 1)),
        lambda: wire.Ping(-1),
        lambda: wire.Ping(2**64),
        lambda: wire.Error(wire.ErrorCode.FAILED, "x" * (wire.MAX_ERROR_TEXT + 1)),
        lambda: wire.Error(wire.ErrorCode.FAILED, "two\nlines"),
        lambda: wire.Error(wire.ErrorCode.FAILED, "\udcff"),
        lambda: wire.Error(9, "unknown code"),
    ]:
        with pytest.raises(ProtocolError):
            make()


PROTOBUF_FIELDS = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 10), st.integers(0, 2**64 - 1)).map(
            lambda f: encode_varint(f[0] << 3) + encode_varint(f[1])
        ),
        st.tuples(st.integers(1, 10), st.binary(max_size=70)).map(
            lambda f: encode_varint(f[0] << 3 | 2) + encode_varint(len(f[1])) + f[1]
        ),
        st.binary(max_size=3),
    ),
    max_size=6,
).map(b"".join)
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(0, 2**20),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(valid: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(valid)
    for op, where, value in edits:
        if op == "insert":
            out.insert(where % (len(out) + 1), value)
        elif out:
            i = where % len(out)
            if op == "flip":
                out[i] ^= 1 << (value % 8)
            elif op == "set":
                out[i] = value
            else:
                del out[i]
    return bytes(out)


def check_wire(data: bytes) -> None:
    """Only ProtocolError; whatever decodes, encodes to something that decodes the same."""
    message = outcome(wire.decode, data)
    if not isinstance(message, ProtocolError):
        assert isinstance(message, wire.Message)
        assert wire.decode(message.encode()) == message


SMALL_MESSAGES = [m.encode() for m in MESSAGES if not isinstance(m, wire.Chunk)]


@FUZZ
@given(data=st.binary(max_size=600))
def test_wire_decode_random_bytes(data):
    check_wire(data)


@FUZZ
@given(kind=st.integers(0, 10), fields=PROTOBUF_FIELDS)
def test_wire_decode_protobuf_shaped_garbage(kind, fields):
    check_wire(bytes([kind]) + fields)


@FUZZ
@given(valid=st.sampled_from(SMALL_MESSAGES), edits=EDITS)
def test_wire_decode_edited_messages(valid, edits):
    check_wire(mutate(valid, edits))


@pytest.mark.parametrize("valid", SMALL_MESSAGES, ids=lambda d: T(d[0]).name)
def test_wire_decode_every_prefix(valid):
    for cut in range(len(valid)):
        check_wire(valid[:cut])


# -- FileOffer and WebRTCSignal ------------------------------------------------------

OFFER = FileOffer(TRANSFER_ID, URI, rng("key")(32), rng("sha")(32))
SIGNALS = [
    WebRTCSignal(TRANSFER_ID, SignalType.OFFER, "v=0\r\na=fingerprint:sha-256 AB\r\n"),
    WebRTCSignal(TRANSFER_ID, SignalType.ANSWER, "v=0\r\n"),
    WebRTCSignal(TRANSFER_ID, SignalType.BYE, reason=ByeReason.DONE),
    WebRTCSignal(TRANSFER_ID, SignalType.BYE, reason=ByeReason.FAILED, text="disk full 💾"),
]


def app(kind: int, content_body: bytes) -> bytes:
    """An application message of ``kind`` around any body."""
    return Writer().uint(1, kind).bytes_(2, b"i" * 16).uint(3, 1).bytes_(5, content_body).finish()


def content_of(data: bytes) -> object:
    return AppMessage.decode(data).content


@pytest.mark.parametrize("content", [OFFER, *SIGNALS], ids=repr)
def test_offer_and_signal_round_trip(content):
    message = AppMessage(b"i" * 16, 1, 2, content)
    assert AppMessage.decode(message.encode()) == message


def test_the_offer_carries_a_uri_the_transfer_layer_parses():
    offer = content_of(AppMessage(b"i" * 16, 1, 2, OFFER).encode())
    assert isinstance(offer, FileOffer)
    assert parse_uri(offer.uri) == REF


def offer_body(
    id: bytes = TRANSFER_ID, uri: str = URI, key: bytes = bytes(32), sha: bytes = bytes(32)
) -> bytes:
    return Writer().bytes_(1, id).text(2, uri).bytes_(3, key).bytes_(4, sha).finish()


def signal_body(type_: int, payload: str = "", reason: int = 0, text: str = "") -> bytes:
    return (
        Writer()
        .bytes_(1, TRANSFER_ID)
        .uint(2, type_)
        .text(3, payload)
        .uint(4, reason)
        .text(5, text)
        .finish()
    )


CONTENT_REFUSALS = {
    "offer with a short transfer ID": (Kind.FILE_OFFER, offer_body(id=TRANSFER_ID[:15])),
    "offer without a URI": (Kind.FILE_OFFER, offer_body(uri="")),
    "offer with a URI of 4097 bytes": (Kind.FILE_OFFER, offer_body(uri="x" * 4097)),
    "offer with a short key": (Kind.FILE_OFFER, offer_body(key=bytes(31))),
    "offer without a key": (Kind.FILE_OFFER, offer_body(key=b"")),
    "offer with a long SHA-256": (Kind.FILE_OFFER, offer_body(sha=bytes(33))),
    "offer as an empty body": (Kind.FILE_OFFER, b""),
    "offer of the old layout": (
        Kind.FILE_OFFER,
        Writer().text(1, URI).text(2, "photo.jpg").uint(3, 5).finish(),
    ),
    "signal of type 3 (candidate)": (Kind.WEBRTC_SIGNAL, signal_body(3, "candidate:1")),
    "signal of type 0": (Kind.WEBRTC_SIGNAL, signal_body(0, "v=0")),
    "signal of type 5": (Kind.WEBRTC_SIGNAL, signal_body(5, "v=0")),
    "offer without an SDP": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.OFFER)),
    "answer with a reason": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.ANSWER, "v=0", 1)),
    "answer with text": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.ANSWER, "v=0", text="x")),
    "bye without a reason": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.BYE, text="x")),
    "bye with an SDP": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.BYE, "v=0", 1)),
    "bye of reason 5": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.BYE, reason=5)),
    "bye text of 201 bytes": (
        Kind.WEBRTC_SIGNAL,
        signal_body(SignalType.BYE, reason=4, text="x" * (MAX_REASON_BYTES + 1)),
    ),
    "bye text of two lines": (
        Kind.WEBRTC_SIGNAL,
        signal_body(SignalType.BYE, reason=4, text="disk\nfull"),
    ),
    "bye text with a direction override": (
        Kind.WEBRTC_SIGNAL,
        signal_body(SignalType.BYE, reason=4, text="\u202eevil"),
    ),
    "an SDP over 64 KiB": (Kind.WEBRTC_SIGNAL, signal_body(SignalType.OFFER, "v" * 65537)),
}


@pytest.mark.parametrize("case", sorted(CONTENT_REFUSALS))
def test_offer_and_signal_decoding_is_strict(case):
    kind, content_body = CONTENT_REFUSALS[case]
    refused(content_of, app(kind, content_body))


def test_offers_and_signals_that_break_a_rule_cannot_be_made():
    for make in [
        lambda: FileOffer(TRANSFER_ID, "", bytes(32), bytes(32)),
        lambda: FileOffer(TRANSFER_ID, "\udcff", bytes(32), bytes(32)),
        lambda: FileOffer(TRANSFER_ID, URI, bytes(16), bytes(32)),
        lambda: WebRTCSignal(TRANSFER_ID, SignalType.BYE),
        lambda: WebRTCSignal(TRANSFER_ID, SignalType.OFFER),
        lambda: WebRTCSignal(TRANSFER_ID, SignalType.OFFER, "v=0", ByeReason.DONE),
        lambda: WebRTCSignal(TRANSFER_ID, SignalType.BYE, reason=ByeReason.FAILED, text="a\nb"),
        lambda: WebRTCSignal(TRANSFER_ID, 3, "candidate:1"),
        lambda: WebRTCSignal(TRANSFER_ID[:8], SignalType.ANSWER, "v=0"),
    ]:
        with pytest.raises(ProtocolError):
            make()


def test_fit_reason_examples():
    assert fit_reason("x" * 500) == "x" * MAX_REASON_BYTES
    assert fit_reason("é" * 150) == "é" * (MAX_REASON_BYTES // 2)
    assert fit_reason("€" * 100) == "€" * (MAX_REASON_BYTES // 3)  # cut on a character boundary
    assert fit_reason("disk\nfull\u202e\udcff") == "disk full  "


@FUZZ
@given(text=st.text(st.characters(exclude_categories=()), max_size=400))
def test_fit_reason_always_gives_a_valid_reason(text):
    fitted = fit_reason(text)
    check_reason(fitted)
    WebRTCSignal(TRANSFER_ID, SignalType.BYE, reason=ByeReason.FAILED, text=fitted)
    if text.isprintable() and len(text.encode()) <= MAX_REASON_BYTES:
        assert fitted == text


VALID_CONTENT = [AppMessage(b"i" * 16, 1, 2, c).encode() for c in [OFFER, *SIGNALS]]


def check_content(data: bytes) -> None:
    message = outcome(AppMessage.decode, data)
    if not isinstance(message, ProtocolError):
        assert isinstance(message, AppMessage)
        assert AppMessage.decode(message.encode()) == message


@FUZZ
@given(kind=st.sampled_from([Kind.FILE_OFFER, Kind.WEBRTC_SIGNAL]), fields=PROTOBUF_FIELDS)
def test_offer_and_signal_bodies_of_garbage(kind, fields):
    check_content(app(kind, fields))


@FUZZ
@given(valid=st.sampled_from(VALID_CONTENT), edits=EDITS)
def test_offer_and_signal_messages_edited(valid, edits):
    check_content(mutate(valid, edits))
