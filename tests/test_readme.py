"""The README's code is run, so the front door never lies."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    namespace: dict[str, object] = {}
    exec(blocks[0], namespace)
    assert namespace["text"] == b"hi"


def test_readme_has_exactly_two_setup_commands():
    shell = re.findall(r"```sh\n(.*?)```", README, re.S)
    setup = [block for block in shell if "python3 -m venv" in block]
    assert len(setup) == 2
    assert any("pigeon demo" in block for block in setup)
    assert any("pytest" in block for block in setup)
