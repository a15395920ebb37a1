"""History paging and full-text search over a real encrypted database."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conversations import Clock, exchange, friends

from pigeon.node.conversations import Conversations
from pigeon.node.storage import Database
from pigeon.protocol import LocalProtocolError


@pytest.fixture(scope="module")
def talk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Conversations, Conversations]:
    root = tmp_path_factory.mktemp("talk")
    clock = Clock()
    alice, bob = friends(root, clock)
    for i in range(25):
        alice.send_text(
            bob.identity.public_key, f"message {i} about apples" if i % 5 == 0 else f"message {i}"
        )
        clock.now += 1
    exchange(alice, bob)
    bob.send_text(alice.identity.public_key, "Pears are better, don't you think?")
    exchange(bob, alice)
    return alice, bob


def test_history_pages_back_through_a_conversation(talk):
    alice, bob = talk
    key = alice.identity.public_key
    newest = bob.history(key, 10)
    assert [m["text"] for m in newest][-1] == "Pears are better, don't you think?"
    assert newest[0]["text"] == "message 16"
    seen = [m["text"] for m in newest]
    page = newest
    while True:
        page = bob.history(key, 10, bytes.fromhex(str(page[0]["id"])))
        if not page:
            break
        seen = [m["text"] for m in page] + seen
    assert seen == [m["text"] for m in bob.inbox(key)]  # every message once, in order
    assert len(seen) == 26
    with pytest.raises(Exception, match="no message with that ID"):
        bob.history(key, 10, bytes(16))


def test_search_finds_by_a_word_in_a_message_and_not_by_one_that_is_not(talk):
    _, bob = talk
    found = [m["text"] for m in bob.search("apples", 50)]
    assert sorted(found) == sorted(f"message {i} about apples" for i in range(0, 25, 5))
    assert [m["text"] for m in bob.search("PEARS think", 50)] == [
        "Pears are better, don't you think?"
    ]
    assert bob.search("bananas", 50) == []
    assert bob.search("apples pears", 50) == []  # every word must be there
    assert len(bob.search("message", 3)) == 3
    # Words are words: the index's query language is never read from them.
    for text in ('"', "AND", "apples OR", "NEAR(apples", "*", "apples*", "col:apples", "don't"):
        with contextlib.suppress(LocalProtocolError):
            bob.search(text, 50)


def test_search_follows_deletions_and_sees_older_databases(tmp_path: Path):
    clock = Clock()
    alice, bob = friends(tmp_path, clock)
    alice.send_text(bob.identity.public_key, "a secret plan")
    exchange(alice, bob)
    assert bob.search("secret", 10)
    bob.contacts.remove(bob.contacts.get(alice.identity.public_key))
    assert bob.search("secret", 10) == []
    assert alice.search("secret", 10)  # her copy, indexed too
    # A database from before the index: opened, migrated, and its past searchable.
    alice.db.execute("DROP TABLE messages_fts")
    for trigger in ("insert", "delete", "update"):
        alice.db.execute(f"DROP TRIGGER messages_fts_{trigger}")
    alice.db.execute("DROP INDEX messages_by_expiry")
    for table, column in (
        ("contacts", "timer_s"),
        ("messages", "expires_at"),
        ("outbox", "expires_at"),
        ("request_messages", "expires_at"),
        ("requests", "mailbox_token"),
    ):
        alice.db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    alice.db.execute("PRAGMA user_version = 8")
    path = alice.db.path.parent
    alice.db.close()
    reopened = Conversations(Database.open(path, "pw"), alice.random, clock)
    assert [m["text"] for m in reopened.search("plan", 10)] == ["a secret plan"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_search_takes_any_text(text):
    bob = _SEARCHER[0]
    try:
        bob.search(text, 5)
    except LocalProtocolError:
        assert not [w for w in text.replace("\x00", " ").split() if w.strip('"')]


_SEARCHER: list[Conversations] = []


@pytest.fixture(autouse=True, scope="module")
def _searcher(talk):
    _SEARCHER.append(talk[1])
