"""Test ordering for the two workers: the longest files first, so that the
simulation runs (about seven minutes on one worker) overlap with everything
else instead of running alone at the end (pytest-xdist's --dist loadfile
hands out whole files in the order they were collected)."""

from __future__ import annotations

import pytest

LONGEST_FIRST = (
    "test_sim.py",
    "test_nat.py",
    "test_mailbox_e2e.py",
    "test_no_silent_loss.py",
    "test_transfer_e2e.py",
    "test_hostile_mailbox.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
