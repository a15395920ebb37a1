"""pigeon.protocol is pure: no networking, storage, clock or event loop."""

import ast
import subprocess
import sys
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"
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


def test_the_check_catches_an_impure_module(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom time import monotonic\n")
    assert imported_roots(bad) & FORBIDDEN == {"trio", "time"}
