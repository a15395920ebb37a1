"""pigeon.protocol, and the pure modules of pigeon.transfer, are pure: no
networking, storage, clock or event loop (and, for transfer, no randomness
source: keys come from a Random the caller passes)."""

import ast
import subprocess
import sys
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"
TRANSFER = Path(__file__).resolve().parent.parent / "transfer"
# The transfer modules that must stay pure; the others (the aiortc session,
# the engine that reads and writes files) do I/O and are not checked.
PURE_TRANSFER = ("manifest", "reference", "wire")
FORBIDDEN = {
    "trio",
    "libp2p",
    "aiortc",
    "asyncio",
    "sqlite3",
    "sqlcipher3",
    "socket",
    "time",
    "datetime",
    "threading",
    "subprocess",
    "multiaddr",
}
RANDOMNESS = {"os", "random", "secrets"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_protocol_sources_import_nothing_impure():
    files = sorted(PROTOCOL.glob("*.py"))
    assert len(files) > 5
    offenders = {f.name: sorted(imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_protocol_loads_no_io_frameworks():
    code = (
        "import sys, pigeon.protocol\n"
        "bad = sorted(m for m in ('trio', 'libp2p', 'aiortc', 'asyncio', 'sqlite3', 'sqlcipher3')"
        " if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def relative_imports(path: Path) -> set[str]:
    """The sibling modules a module imports (``from .x import y``, ``from . import x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


def test_pure_transfer_modules_import_nothing_impure():
    files = [TRANSFER / f"{name}.py" for name in PURE_TRANSFER]
    offenders = {f.name: sorted(imported_roots(f) & (FORBIDDEN | RANDOMNESS)) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
    # Only from each other (and from pigeon.protocol): a sibling that does I/O
    # would make them impure through the back door.
    siblings = {f.name: sorted(relative_imports(f) - set(PURE_TRANSFER)) for f in files}
    assert {k: v for k, v in siblings.items() if v} == {}


def test_importing_pure_transfer_modules_loads_no_io_frameworks():
    # Loaded from their files, so the package's __init__ (which may reach the
    # impure modules) does not count.
    code = (
        "import importlib.util, sys, types\n"
        "import pigeon.protocol\n"
        "package = types.ModuleType('pigeon.transfer')\n"
        f"package.__path__ = [{str(TRANSFER)!r}]\n"
        "sys.modules['pigeon.transfer'] = package\n"
        f"for name in {PURE_TRANSFER!r}:\n"
        "    importlib.import_module('pigeon.transfer.' + name)\n"
        "bad = sorted(m for m in ('trio', 'libp2p', 'aiortc', 'asyncio', 'sqlite3', 'sqlcipher3')"
        " if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_check_catches_an_impure_module(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import trio\nfrom time import monotonic\nfrom . import rtc\nfrom .engine import x\n"
    )
    assert imported_roots(bad) & FORBIDDEN == {"trio", "time"}
    assert relative_imports(bad) == {"rtc", "engine"}
