"""Hostile clients of the control socket (docs/CONTROL.md).  Every line gets a
one-line reply and the connection stays usable; no request, however shaped,
and no bug in a handler ends the daemon; a client cannot hold more than
MAX_CONNECTIONS connections, and a follower that hangs up leaves nothing
behind.  Each test ends by checking the daemon still answers and still delivers
messages."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlcipher3
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from daemons import Daemon, pigeon, wait_for
from pigeon.node import control
from pigeon.protocol import ContactCode, IdentityKeyPair

pytestmark = pytest.mark.slow

# The commands and their arguments, as docs/CONTROL.md lists them.
COMMANDS: dict[str, tuple[str, ...]] = {
    "id": (),
    "contacts.add": ("code", "alias"),
    "contacts.rename": ("contact", "alias"),
    "contacts.remove": ("contact",),
    "contacts.list": (),
    "send": ("contact", "text"),
    "inbox": ("contact", "after"),
    "follow": ("contact", "after"),
    "read": ("contact",),
    "status": (),
    "lookup": ("contact",),
    "stop": (),
}
STRING_ARGUMENTS = {"code", "alias", "contact", "text"}
REQUIRED = {
    "contacts.add": {"code"},
    "contacts.rename": {"contact", "alias"},
    "contacts.remove": {"contact"},
    "send": {"contact", "text"},
    "read": {"contact"},
    "lookup": {"contact"},
}
MAX_ERROR = 200  # characters in an error reply
CAP = 64  # control connections served at once


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """A bootstrap node, and Alice and Bob, each the other's contact."""
    root = tmp_path_factory.mktemp("control")
    nodes = {"boot": Daemon(root, "boot").start()}
    try:
        boot = [nodes["boot"].address]
        for name in ("alice", "bob"):
            nodes[name] = Daemon(root, name, boot).launch()
        for name in ("alice", "bob"):
            nodes[name].wait_ready()
        alice, bob = nodes["alice"], nodes["bob"]
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        yield nodes
    finally:
        for daemon in nodes.values():
            if daemon.alive():
                daemon.stop()


class Connection:
    """A raw control connection: lines out, lines in."""

    def __init__(self, daemon: Daemon, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # connect blocking: with a timeout set, a full listen queue is EAGAIN
            self.sock.connect(str(daemon.home / control.SOCKET_NAME))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def send_until_closed(self, line: bytes) -> None:
        """Send a line the daemon may stop reading half-way (closing the connection)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send(line)

    def reply(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\n"), f"no reply line (the daemon closed it?): {line[:200]!r}"
        value = json.loads(line)
        assert isinstance(value, dict) and isinstance(value.get("ok"), bool), line[:200]
        if value["ok"] is False:
            error = value.get("error")
            assert isinstance(error, str) and error, line[:200]
            assert len(error) <= MAX_ERROR and error.isprintable(), error
            assert "Traceback" not in error and " object at 0x" not in error, error
        return value

    def ask(self, line: bytes) -> dict[str, Any]:
        self.send(line)
        return self.reply()

    def closed_by_daemon(self) -> bool:
        """The daemon has closed the connection (a reset: it left our line unread)."""
        try:
            return self.file.readline() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def delivers(sender: Daemon, recipient: Daemon, contact: str, text: str) -> None:
    sender.cli("send", contact, text)
    wait_for(lambda: any(m["text"] == text for m in recipient.inbox()), timeout=30)


def still_well(daemon: Daemon) -> None:
    assert daemon.alive(), daemon.log.read_text()[-2000:]
    assert daemon.cli("status", check=False).returncode == 0, daemon.log.read_text()[-2000:]


def hostile_table(bob_code: str) -> list[tuple[str, bytes, str]]:
    """(what, the line, what the reply must be): "bad" (bad request), "error"
    (any error: the shape is right, the request is not) or "ok"."""
    valid = {"code": bob_code, "alias": "bobby", "contact": "bob", "text": "hi", "after": 0}
    not_strings: list[Any] = [5, -1, 1.5, True, False, [], ["bob"], {}, {"a": "b"}]
    not_numbers: list[Any] = [-1, 1.5, True, False, "5", "", [], [5], {}, {"a": 1}]
    table: list[tuple[str, bytes, str]] = []

    def line(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    for cmd, arguments in COMMANDS.items():
        base = {"cmd": cmd, **{a: valid[a] for a in arguments if a in REQUIRED.get(cmd, ())}}
        # an argument the command does not take is refused, not ignored (stop
        # comes last: if it were served, it would end the daemon)
        if cmd != "stop":
            table.append((f"{cmd} with an unknown argument", line({**base, "x": 1}), "bad"))
        for argument in arguments:
            for value in not_strings if argument in STRING_ARGUMENTS else not_numbers:
                request = {**base, argument: value}
                table.append((f"{cmd} {argument}={value!r}", line(request), "bad"))
            if argument in REQUIRED.get(cmd, ()):
                missing = {k: v for k, v in base.items() if k != argument}
                table.append((f"{cmd} without {argument}", line(missing), "bad"))
                table.append((f"{cmd} {argument}=null", line({**base, argument: None}), "bad"))
            if argument in STRING_ARGUMENTS:
                surrogate = line(base)[:-1] + b', "' + argument.encode() + b'": "a\\ud800b"}'
                table.append((f"{cmd} {argument} with a lone surrogate", surrogate, "bad"))
                nan = line(base)[:-1] + b', "' + argument.encode() + b'": NaN}'
                table.append((f"{cmd} {argument}=NaN", nan, "bad"))
    deep = 30_000
    table += [
        ("inbox, contact 5", b'{"cmd": "inbox", "contact": 5}', "bad"),
        ("nested 30,000 deep", b"[" * deep + b"]" * deep, "bad"),
        ("an object nested 30,000 deep", b'{"a":' * deep + b"1" + b"}" * deep, "bad"),
        (
            "an argument nested 30,000 deep",
            b'{"cmd": "send", "contact": "bob", "text": ' + b"[" * deep + b"]" * deep + b"}",
            "bad",
        ),
        ("opened 1,000,000 deep", b"[" * 1_000_000, "bad"),
        ("after 2**63 - 1", b'{"cmd": "inbox", "after": 9223372036854775807}', "ok"),
        ("after 2**63", b'{"cmd": "inbox", "after": 9223372036854775808}', "bad"),
        ("after 10**30", b'{"cmd": "inbox", "after": ' + b"1" + b"0" * 30 + b"}", "bad"),
        ("after -10**30", b'{"cmd": "follow", "after": -' + b"1" + b"0" * 30 + b"}", "bad"),
        ("after of 5,000 digits", b'{"cmd": "inbox", "after": ' + b"7" * 5000 + b"}", "bad"),
        ("after 1e400", b'{"cmd": "inbox", "after": 1e400}', "bad"),
        ("after -1e400", b'{"cmd": "inbox", "after": -1e400}', "bad"),
        ("after 1e-400", b'{"cmd": "inbox", "after": 1e-400}', "bad"),
        ("after 1.0", b'{"cmd": "inbox", "after": 1.0}', "bad"),
        ("after NaN", b'{"cmd": "inbox", "after": NaN}', "bad"),
        ("after Infinity", b'{"cmd": "follow", "after": Infinity}', "bad"),
        ("after -Infinity", b'{"cmd": "inbox", "after": -Infinity}', "bad"),
        ("after null", b'{"cmd": "inbox", "after": null}', "ok"),
        ("a surrogate command", b'{"cmd": "\\udc80"}', "bad"),
        ("a surrogate key", b'{"cmd": "status", "\\ud800": 1}', "bad"),
        ("a surrogate pair is fine", b'{"cmd": "inbox", "contact": "\\ud83d\\udc26"}', "error"),
        ("an empty object", b"{}", "bad"),
        ("an array", b"[]", "bad"),
        ("an array of a request", b'[{"cmd": "status"}]', "bad"),
        ("a string", b'"status"', "bad"),
        ("a number", b"5", "bad"),
        ("null", b"null", "bad"),
        ("true", b"true", "bad"),
        ("cmd null", b'{"cmd": null}', "bad"),
        ("cmd 5", b'{"cmd": 5}', "bad"),
        ("cmd empty", b'{"cmd": ""}', "bad"),
        ("cmd an array", b'{"cmd": ["status"]}', "bad"),
        ("an unknown command", b'{"cmd": "fly"}', "bad"),
        ("a long unknown command", b'{"cmd": "' + b"x" * 500_000 + b'"}', "bad"),
        ("a key given twice", b'{"cmd": "status", "cmd": "stop"}', "bad"),
        ("non-UTF-8 bytes", b"\xff\xfe\xfd", "bad"),
        ("NULs", b"\x00" * 10, "bad"),
        ("an overlong UTF-8 slash", b'{"cmd": "\xc0\xaf"}', "bad"),
        ("a surrogate in raw UTF-8", b'{"cmd": "inbox", "contact": "\xed\xa0\x80"}', "bad"),
        ("only whitespace", b"  \t \r", "bad"),
        ("an empty line", b"", "bad"),
        ("two objects on a line", b'{"cmd": "status"} {"cmd": "status"}', "bad"),
        ("truncated", b'{"cmd": "status"', "bad"),
        ("an unknown contact", b'{"cmd": "read", "contact": "nobody"}', "error"),
        ("a huge contact", b'{"cmd": "read", "contact": "' + b"z" * 500_000 + b'"}', "error"),
        (
            "a contact with escapes",
            b'{"cmd": "read", "contact": "\\u001b[31m\\n\\r\\u2028x"}',
            "error",
        ),
        ("a text too long", line({"cmd": "send", "contact": "bob", "text": "x" * 70_000}), "error"),
        ("an empty text", line({"cmd": "send", "contact": "bob", "text": ""}), "error"),
        ("a junk contact code", line({"cmd": "contacts.add", "code": "pigeon:zz"}), "error"),
        (
            "a long alias",
            line({"cmd": "contacts.rename", "contact": "bob", "alias": "b" * 999}),
            "error",
        ),
        (
            "an alias with a newline",
            line({"cmd": "contacts.rename", "contact": "bob", "alias": "a\nb"}),
            "error",
        ),
        ("a valid request", b'{"cmd": "status"}', "ok"),
        ("another valid request", b'{"cmd": "inbox", "contact": "bob", "after": 0}', "ok"),
        ("stop with an unknown argument", b'{"cmd": "stop", "now": true}', "bad"),
    ]
    return table


def wrong(connection: Connection, expected: str) -> str | None:
    """What is wrong with the next reply, if anything."""
    try:
        reply = connection.reply()
    except (AssertionError, OSError, ValueError) as error:
        return f"no proper reply: {str(error)[:200]}"
    if expected == "ok" and reply["ok"] is not True:
        return f"refused: {reply}"
    if expected != "ok" and reply["ok"] is not False:
        return f"served: {str(reply)[:200]}"
    if expected == "bad" and not reply["error"].startswith("bad request: "):
        return f"not a bad request: {reply}"
    return None


def test_hostile_requests_get_one_line_errors(network):
    alice, bob = network["alice"], network["bob"]
    table = hostile_table(bob.id()["contact_code"])
    problems: list[str] = []
    connection = Connection(alice)
    try:
        for what, line, expected in table:
            connection.send_until_closed(line)
            problem = wrong(connection, expected)
            if problem is not None:
                problems.append(f"{what}: {problem}")
                connection.close()
                try:
                    connection = Connection(alice)
                except OSError:
                    problems.append("and the daemon is gone")
                    break
        assert not problems, "\n".join(problems)
        # all of it again, pipelined on one connection, read as it comes
        pipelined = b"".join(line + b"\n" for _, line, _ in table)
        writer = threading.Thread(target=connection.sock.sendall, args=(pipelined,))
        writer.start()
        try:
            for what, _, expected in table:
                problem = wrong(connection, expected)
                assert problem is None, f"pipelined: {what}: {problem}"
        finally:
            writer.join()
        assert connection.ask(b'{"cmd": "status"}')["ok"] is True
    finally:
        connection.close()
    # a line over the limit is refused and ends the connection; so does 1,000,000 deep
    for line in (b"[" * 1_000_000 + b"]" * 1_000_000, b"x" * (control.MAX_REQUEST + 1)):
        connection = Connection(alice)
        try:
            connection.send_until_closed(line)
            reply = connection.reply()
            assert reply["ok"] is False and "larger than" in reply["error"], reply
            assert connection.closed_by_daemon()
        finally:
            connection.close()
    still_well(alice)
    assert "Traceback" not in alice.log.read_text()
    delivers(alice, bob, "bob", "still here after the junk")


BOUNDARIES = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30)]
TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # surrogates too


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, and some Python's JSON writes that others do not accept
    (NaN, Infinity, lone surrogates as \\udXXX escapes)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from(BOUNDARIES)
        | st.floats()
        | TEXT
        | st.sampled_from(["dave", "", "pigeon:", "0000000", " "])
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    )


def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` four times in five (one_of would favour the richer strategy)."""
    return st.sampled_from([True, True, True, True, False]).flatmap(
        lambda usually: usual if usually else other
    )


def values_for(key: str) -> st.SearchStrategy[Any]:
    """Mostly values of the argument's type, near its edges; any JSON value
    the rest of the time."""
    if key == "after":
        typical = st.sampled_from(BOUNDARIES) | st.integers(min_value=-(2**65), max_value=2**65)
    elif key in STRING_ARGUMENTS:
        typical = TEXT | st.sampled_from(["dave", "", "pigeon:", "0000000", "\ud800", "a" * 999])
    else:
        return json_values()
    return mostly(typical, json_values())


def requests() -> st.SearchStrategy[dict[str, Any]]:
    """Requests with a real command (never stop) or junk, and arguments of
    every JSON type, mostly under the command's own argument names (so that
    most requests get past the names to the values), some under other names."""
    real = sorted(set(COMMANDS) - {"stop"})
    names = sorted({a for arguments in COMMANDS.values() for a in arguments})
    junk_keys = st.text(st.characters(exclude_categories=()), max_size=6)

    def with_arguments(cmd: Any) -> st.SearchStrategy[dict[str, Any]]:
        takes = COMMANDS.get(cmd, ()) if isinstance(cmd, str) else ()
        own = st.sampled_from(takes or ("contact",))
        keys = st.lists(mostly(own, st.sampled_from(names) | junk_keys), unique=True, max_size=3)
        arguments = keys.flatmap(lambda ks: st.fixed_dictionaries({k: values_for(k) for k in ks}))
        return arguments.map(lambda given: {**given, "cmd": cmd})

    commands = mostly(st.sampled_from(real), json_values())
    return commands.flatmap(with_arguments)


def test_fuzzed_requests_on_one_connection(network):
    boot = network["boot"]
    # A contact for the fuzz to find (and perhaps rename or remove), one no
    # other test uses; made by hand, no daemon behind it.
    dave = IdentityKeyPair.generate(os.urandom).public_key
    boot.cli("contacts", "add", ContactCode(dave, "dave").to_uri())
    connections = [Connection(boot)]

    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],  # the first failure is the one to see: the daemon may be gone
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests())
    def one(request: dict[str, Any]) -> None:
        reply = connections[-1].ask(json.dumps(request).encode())
        if request["cmd"] == "follow" and reply["ok"]:
            # A follow took the connection over (it streams until closed):
            # hang up, which also checks that costs nothing, and go on.
            connections[-1].close()
            connections.append(Connection(boot))

    try:
        one()
        assert connections[-1].ask(b'{"cmd": "status"}')["ok"] is True
    finally:
        connections[-1].close()
    still_well(boot)
    log = boot.log.read_text()
    assert "Traceback" not in log
    # no handler raised anything but a refusal
    assert "control request" not in log and "control connection failed" not in log
    delivers(network["bob"], network["alice"], "alice", "still here after the fuzz")


def test_the_connection_cap(network):
    bob = network["bob"]
    # CAP followers hold every connection there is ...
    followers: list[Connection] = []
    try:
        for _ in range(CAP):
            followers.append(Connection(bob, timeout=5))
            assert followers[-1].ask(b'{"cmd": "follow", "contact": "alice"}')["ok"] is True
        # ... so one more is refused with a reason, and closed
        extra = Connection(bob, timeout=5)
        try:
            refusal = extra.reply()
            assert refusal["ok"] is False and f"limit is {CAP}" in refusal["error"], refusal
            assert extra.closed_by_daemon()
        finally:
            extra.close()
        # as the command line shows it
        result = pigeon(bob.home, "status", check=False)
        assert result.returncode != 0 and "too many connections" in result.stderr, result
        assert bob.alive()
    finally:
        for follower in followers:
            follower.close()

    def all_served() -> bool:
        """Every follower that hung up has given its connection back."""
        connections = []
        try:
            for _ in range(CAP):
                connections.append(Connection(bob, timeout=5))
                if connections[-1].ask(b'{"cmd": "id"}')["ok"] is not True:
                    return False
            return True
        except (AssertionError, OSError):
            return False
        finally:
            for connection in connections:
                connection.close()

    wait_for(all_served, timeout=10)
    still_well(bob)
    assert "control connections refused" in bob.log.read_text()
    assert control.MAX_CONNECTIONS == CAP, "docs/CONTROL.md gives the limit"
    delivers(bob, network["alice"], "alice", "still here after the crowd")


# -- the error boundary, in process: handlers that fail as a bug would ------


class Boom(Exception):
    pass


FAILURES: dict[str, BaseException] = {
    "type": TypeError("unsupported operand: secret text"),
    "key": KeyError("secret text"),
    "attribute": AttributeError("'int' object has no attribute 'secret'"),
    "recursion": RecursionError("maximum recursion depth exceeded: secret"),
    "database": sqlcipher3.OperationalError("disk I/O error: secret"),
    "group": ExceptionGroup("secret", [Boom("secret text")]),
    "value": ValueError("secret text"),
}


async def _read_line(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        buffer += chunk
    end = buffer.index(b"\n") + 1
    line = bytes(buffer[:end])
    del buffer[:end]
    return line


def test_a_failing_handler_never_ends_the_server(tmp_path, caplog):
    follower_gone = trio.Event()  # bound to no run until waited on

    async def handler(request: dict[str, Any], send: Any) -> dict[str, Any] | None:
        cmd = request["cmd"]
        if cmd in FAILURES:
            raise FAILURES[cmd]
        if cmd == "deep":
            return deep(0)
        if cmd == "follow":
            await send({"ok": True})
            try:
                await trio.sleep_forever()
            finally:
                follower_gone.set()
        return {"ok": True}

    def deep(n: int) -> dict[str, Any]:
        return deep(n + 1)  # a real RecursionError, from deep down

    async def main() -> None:
        path = tmp_path / "c.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path, handler)
            buffer = bytearray()
            async with await trio.open_unix_socket(str(path)) as stream:
                for cmd in [*FAILURES, "deep", "ok"]:
                    request = json.dumps({"cmd": cmd, "text": "secret"}).encode() + b"\n"
                    await stream.send_all(request)
                    reply = json.loads(await _read_line(stream, buffer))
                    if cmd == "ok":
                        assert reply == {"ok": True}
                    else:
                        assert reply["ok"] is False and "internal error" in reply["error"], reply
                        assert "secret" not in reply["error"] and len(reply["error"]) <= MAX_ERROR
            # a follower that hangs up is ended at once, not at its next event
            async with await trio.open_unix_socket(str(path)) as follower:
                await follower.send_all(b'{"cmd": "follow"}\n')
                assert json.loads(await _read_line(follower, bytearray())) == {"ok": True}
            with trio.fail_after(5):
                await follower_gone.wait()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="pigeon.control"):
        trio.run(main)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(FAILURES) + 1, errors
    for message in errors:
        assert "secret" not in message and "\n" not in message, message
    assert any("RecursionError" in message for message in errors)
