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


def test_unknown_command_fails_with_usage():
    result = subprocess.run([pigeon(), "fly"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "invalid choice" in result.stderr
