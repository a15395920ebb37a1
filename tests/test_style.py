"""Style is part of the suite: ruff clean everywhere, mypy strict on every pigeon package
(with calls between the packages checked), and the README's test command is the one CI runs."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_is_clean():
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def typecheck(*args: str, mypypath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The developers' command: mypy with the folders laid out as the installed packages."""
    env = dict(os.environ)
    if mypypath is not None:
        env["MYPYPATH"] = str(mypypath)
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "typecheck.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_mypy_strict_on_every_package():
    result = typecheck()
    assert result.returncode == 0, result.stdout + result.stderr
    # Every module of every package was checked, none skipped as unreachable.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = config["tool"]["setuptools"]["package-dir"].values()
    modules = sum(len(list((ROOT / folder).rglob("*.py"))) for folder in folders)
    assert f"no issues found in {modules} source files" in result.stdout, result.stdout


def test_mypy_checks_calls_between_packages(tmp_path):
    # Were pigeon.* not resolved, both imports would be Any or missing and these
    # wrong calls would pass unnoticed.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from pathlib import Path\n\n"
        "from pigeon.node.storage import Database\n"
        "from pigeon.protocol.crypto import sha256\n\n"
        "DIGEST: bytes = sha256(1)\n"
        "DB: Database = Database.create(str(Path()), 'passphrase')\n"
    )
    # A module on MYPYPATH, checked beside the packages (mypy cannot mix packages and files).
    result = typecheck("-m", "probe", mypypath=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Argument 1 to "sha256" has incompatible type "int"' in result.stdout, result.stdout
    assert 'Argument 1 to "create" of "Database" has incompatible type "str"' in result.stdout


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# --- the README's test command, verbatim ---") + 1]
    assert command in (ROOT / "README.md").read_text()
