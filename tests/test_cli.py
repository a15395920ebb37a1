"""The command line, run as a user runs it: the installed console script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def pigeon() -> str:
    """The console script installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "pigeon"
    path = str(beside) if beside.exists() else shutil.which("pigeon")
    if path is None:
        pytest.fail("the pigeon console script is not installed (pip install -e '.[test]')")
    return path


def test_demo_runs_real_nodes_and_a_conversation():
    result = subprocess.run([pigeon(), "demo"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "safety numbers match: no one sits in between" in lines
    received = [line for line in lines if line.startswith("bob    <- alice:")]
    assert len(received) == 3
    assert "alice  sees all three of her messages as delivered" in lines
    assert lines[-1] == "all nodes stopped"
    numbers = [line.split("safety number ")[1] for line in lines if "safety number " in line]
    assert len(numbers) == 2 and numbers[0] == numbers[1]


def test_the_demo_notices_someone_in_between():
    """The demo's safety numbers come from the keys each side received: when
    Bob's contact code is swapped on its way to Alice, they differ, and the
    demo says so and fails."""
    import os

    from pigeon.protocol import ContactCode, IdentityKeyPair
    from pigeon.ui.demo import run_demo

    mallory = IdentityKeyPair.generate(os.urandom)

    def swap_bobs_code(code: str) -> str:
        parsed = ContactCode.parse(code)
        if parsed.name != "bob":
            return code
        return ContactCode(mallory.public_key, "bob", parsed.addresses).to_uri()

    lines: list[str] = []
    assert run_demo(lines.append, swap_bobs_code) == 1
    assert "safety numbers differ: someone sits in between; stopping" in lines
    numbers = [line.split("safety number ")[1] for line in lines if "safety number " in line]
    assert len(numbers) == 2 and numbers[0] != numbers[1]


def test_demo_help_says_what_it_runs():
    result = subprocess.run([pigeon(), "--help"], capture_output=True, text=True, timeout=60)
    assert "run three real nodes here" in " ".join(result.stdout.split())


def test_unknown_command_fails_with_usage():
    result = subprocess.run([pigeon(), "fly"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize(
    ("text", "answer", "said"),
    [
        ("hello", b"", "the daemon closed the connection"),
        ("é" * 30_000, b"", "connection"),  # hangs up while a long request is written
        ("hello", b"not json\n", "not JSON"),
        ("hello", b"[1, 2]\n", "unexpected"),
    ],
    ids=["hangs up", "hangs up mid-request", "junk", "not an object"],
)
def test_a_control_socket_failure_is_never_a_success(tmp_path, text, answer, said):
    """Whatever goes wrong between the command and the daemon, the command
    fails with one line; it never exits 0 as if the message had gone."""
    import socket
    import threading

    from pigeon.node.control import SOCKET_NAME

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / SOCKET_NAME))
    server.listen(1)

    def daemon_that_fails() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(1024)
            if answer:
                connection.sendall(answer)

    thread = threading.Thread(target=daemon_that_fails, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [pigeon(), "--home", str(tmp_path), "send", "bob", text],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        thread.join(timeout=10)
        server.close()
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0]
