"""mypy strict over every pigeon package, with ``pigeon.*`` imports resolved to this checkout.

Run it from anywhere: ``python tests/typecheck.py [extra mypy options]``.

Why a script and not a bare ``mypy``: the folders install as ``pigeon.protocol``,
``pigeon.node``, ... through setuptools' ``package-dir``, and an editable install maps
them with an import hook that mypy does not run.  Checked as plain folders, node's
``from pigeon.protocol import ...`` would not resolve, so a wrong call from one
package into another would go unnoticed.

So this script lays out the tree the installed package has, as relative symlinks
(``pigeon/protocol`` -> ``protocol/`` and so on, straight from
``[tool.setuptools.package-dir]``, so a package is checked as soon as it is declared
there), points mypy at it and checks every package.  The tree lives in
``.mypy_cache/`` (ignored by git, rebuilt when missing) rather than in a fresh
temporary directory because mypy's cache replays a module's errors under the path
it was first checked at: a new path on every run would make those paths dangling.
The options (strict, the untyped third-party modules) are ``[tool.mypy]`` in
pyproject.toml.  Paths in mypy's report are rewritten from the tree to the folders,
so editors can follow them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path(".mypy_cache", "pigeon-packages")  # relative to ROOT, as mypy is run there


def package_dirs() -> dict[str, str]:
    """The packages pyproject.toml installs, each with its folder in the checkout."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return mapping


def link_tree(packages: dict[str, str]) -> None:
    """Lay out ``packages`` under TREE as the install does, with symlinks to the folders."""
    for package, folder in packages.items():
        link = ROOT / TREE / Path(*package.split("."))
        target = os.path.relpath(ROOT / folder, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        # Made aside and renamed over: another run may be building the same tree.
        fresh = link.with_name(f".{link.name}.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(target, target_is_directory=True)
        os.replace(fresh, link)


def main(argv: list[str]) -> int:
    packages = package_dirs()
    link_tree(packages)
    env = dict(os.environ)
    env["MYPYPATH"] = os.pathsep.join(filter(None, [str(TREE), env.get("MYPYPATH")]))
    if sys.stdout.isatty():
        env.setdefault("MYPY_FORCE_COLOR", "1")  # mypy only colours a terminal
    targets = [arg for package in packages for arg in ("-p", package)]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *targets, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out, err = result.stdout, result.stderr
    for package, folder in packages.items():
        linked = str(TREE / Path(*package.split("."))) + os.sep
        out = out.replace(linked, str(Path(folder)) + os.sep)
        err = err.replace(linked, str(Path(folder)) + os.sep)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
