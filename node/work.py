"""Proofs of work for mailboxes, computed in a worker process.

``do_work`` is a pure-Python loop of SHA-256 calls, each too short for
hashlib to let go of the interpreter lock; in a thread it takes the lock
from the event loop about as often as it gets it, so every stream the node
serves slows down for as long as the work lasts (seconds, and one per
registration, new session and token-less deposit).  In a process of its own
it costs the event loop nothing.  One worker for the whole process: work is
rare, and a node gains nothing from paying two proofs at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import trio

from pigeon.protocol.mailbox import Op, do_work

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _executor(broken: ProcessPoolExecutor | None = None) -> ProcessPoolExecutor:
    """The worker pool; a new one in place of ``broken`` (its worker died)."""
    global _pool
    with _lock:
        if _pool is None or _pool is broken:
            # "spawn": a fork would copy the parent's threads' locks mid-use.
            _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return _pool


async def _wait(future: Future[bytes]) -> bytes:
    """The future's result, without a thread and cancellable."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Future[bytes]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


async def prove(op: Op, box: bytes, subject: bytes, bits: int, start: int) -> bytes:
    """A nonce showing ``bits`` of work for ``op`` on ``box`` and ``subject``."""
    pool = _executor()
    for attempt in range(2):
        try:
            future: Future[bytes] = pool.submit(do_work, op, box, subject, bits, start)
            try:
                return await _wait(future)
            finally:
                future.cancel()  # if it has not started; a started one ends by itself
        except BrokenProcessPool:
            if attempt:
                raise
            pool = _executor(broken=pool)
    raise AssertionError("unreachable")
