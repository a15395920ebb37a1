"""File transfer speed between two Pigeon daemons on loopback, against baselines.

    python benchmarks/transfer.py [--size-mb 100] [--json] [--baseline-only | --no-baseline]
                                  [--rss-every SECONDS]

Pigeon: two ``pigeon daemon`` processes on 127.0.0.1 (the receiver bootstraps
from the sender, as in benchmarks/messaging.py), each the other's contact.  The
sender offers a file of random bytes; the clock runs from the receiver's
``files.accept`` to its transfer reading "done" (the daemon has checked the
SHA-256 and moved the file into place), polled on the control socket every
0.1 s; then this process hashes the received file against the one sent.
cpu_s_per_mb: each daemon's utime + stime (/proc/PID/stat) over that span, per
MB.  peak_rss_mb: each daemon's VmHWM (/proc/PID/status) over its whole life,
which includes unlocking its key (Argon2id takes 256 MiB for a moment);
transfer_peak_rss_mb: the same from the accept on (VmHWM is reset there through
/proc/PID/clear_refs).  ``--rss-every`` also samples both daemons' VmRSS during
the transfer.  Each step has a time limit; the daemons are stopped and the
files removed however the run ends.

Baselines, measured in the same run (the ends are in benchmarks/transfer_peers.py):

- ``plain_aiortc``: the same bytes over one plain aiortc data channel between
  two processes, in 64 KiB messages, the sender pausing above 2 MiB of
  ``bufferedAmount`` until ``bufferedamountlow`` (512 KiB), ICE on 127.0.0.1
  with no ICE servers, SDP passed through this process.
- ``libp2p_stream``: the same bytes over one bare py-libp2p stream (Noise,
  yamux, TCP on 127.0.0.1).

mb_s: payload MB (10^6 bytes) per second from the sender's channel open (or
stream open) to the receiver holding every byte, SHA-256 checked against the
sender's.  cpu_s: each process's CPU over its share of that transfer (the
sender's ends when the receiver confirms); process_cpu_s: whole process,
imports included.  peak_rss_mb: each process's peak resident set (10^6 bytes).
Each process gets a time limit, and is killed if it overstays it.

--json prints one line: pigeon_mb_s, baseline_mb_s (plain aiortc), ratio (the
first over the second), cpu_s_per_mb, peak_rss_mb and transfer_peak_rss_mb of
the two daemons, baseline_cpu_s_per_mb, baseline_peak_rss_mb,
libp2p_stream_mb_s, size_mb, pigeon_seconds, pigeon_first_bytes_s (from the
accept to the first poll showing bytes received), pigeon_bytes_sent (by the
sending daemon, authentication tags and resends included) and, with
--rss-every, rss_mb_samples ([seconds since the accept, sender's VmRSS,
receiver's VmRSS] ...); what a run did not measure is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from daemons import Daemon
from pigeon.node.control import Client
from pigeon.protocol import PigeonError

PEERS = Path(__file__).resolve().with_name("transfer_peers.py")
MB = 1_000_000
MESSAGE_BYTES = 64 * 1024
GRACE_S = 15.0  # a peer's own time limit fires first; the parent kills this much later
POLL_S = 0.1  # how often the receiving daemon's transfer is looked at
WRITE_BYTES = 16 * MB  # the random file is written in pieces of this size
ENDED = frozenset({"failed", "refused", "cancelled"})  # transfer states short of "done"
OFFER_S = 30.0  # for the offer to reach the receiver; plus hashing time, for the sender to make it
HASH_RATE = 5 * MB  # bytes per second the sender is allowed for hashing its file
LOG_LINES = 12  # of each daemon's log, shown when the Pigeon transfer fails


class BenchmarkError(Exception):
    """A peer failed, overstayed its time limit or delivered the wrong bytes."""


def default_timeout(size_bytes: int) -> float:
    """Seconds allowed for one baseline: a start-up allowance plus 0.5 MB/s."""
    return 30 + size_bytes / (0.5 * MB)


class Peer:
    """One end of a baseline in its own process, speaking JSON lines on stdin/stdout."""

    def __init__(self, role: str, size: int, message: int, timeout: float) -> None:
        self.role = role
        options = ["--size", str(size), "--message", str(message), "--timeout", str(timeout)]
        self.process = subprocess.Popen(
            [sys.executable, str(PEERS), role, *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: deque[str] = deque(maxlen=15)  # the last lines of its stderr
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._keep_errors, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as stdout:
            for line in stdout:
                self.lines.put(line)
        self.lines.put("")

    def _keep_errors(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr as stderr:
            for line in stderr:
                self.errors.append(line.rstrip())

    def receive(self, deadline: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise self.failure("said nothing within its time limit") from None
        if not line:
            try:
                self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise self.failure("closed its output but did not exit") from None
            raise self.failure(f"exited with status {self.process.returncode}")
        try:
            message: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise self.failure(f"wrote {line.strip()!r}") from None
        return message

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def finish(self, deadline: float) -> tuple[float, float]:
        """Tell the peer to close, reap it: (CPU seconds, peak RSS in MB) of its life."""
        with contextlib.suppress(BrokenPipeError):  # a sender may be gone already
            self.send({"close": True})
        while True:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise self.failure("did not exit within its time limit")
            time.sleep(0.05)
        if self.process.returncode:
            raise self.failure(f"exited with status {self.process.returncode}")
        return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / MB  # KiB on Linux

    def failure(self, what: str) -> BenchmarkError:
        return BenchmarkError("\n".join([f"{self.role} {what}", *self.errors]))

    def stop(self) -> None:
        """Kill the peer if it still runs, and release its pipes."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()


@contextlib.contextmanager
def peers(stack: str, size: int, message: int, timeout: float) -> Iterator[tuple[Peer, Peer]]:
    """The sender and the receiver of ``stack`` (aiortc or libp2p), stopped on the way out."""
    started: list[Peer] = []
    try:
        for side in ("sender", "receiver"):
            started.append(Peer(f"{stack}-{side}", size, message, timeout))
        yield started[0], started[1]
    finally:
        for peer in started:
            peer.stop()


def conclude(
    size: int, message: int, sender: Peer, receiver: Peer, deadline: float
) -> dict[str, Any]:
    """Collect both results, check the bytes, reap both peers: the figures both baselines share."""
    got = receiver.receive(deadline)
    sent = sender.receive(deadline)
    if got["bytes"] != size or got["sha256"] != sent["sha256"]:
        raise BenchmarkError(
            f"{sender.role}: the receiver got {got['bytes']} bytes hashing to {got['sha256']},"
            f" sent {size} hashing to {sent['sha256']}"
        )
    usage = {"sender": sender.finish(deadline), "receiver": receiver.finish(deadline)}
    seconds = got["end"] - sent["start"]
    cpu = {"sender": sent["cpu_s"], "receiver": got["cpu_s"]}
    return {
        "size_bytes": size,
        "message_bytes": message,
        "connect_s": round(sent["connect_s"], 3),
        "seconds": round(seconds, 3),
        "mb_s": round(size / MB / seconds, 2),
        "cpu_s": {side: round(value, 2) for side, value in cpu.items()},
        "cpu_s_per_mb": {side: round(value / (size / MB), 4) for side, value in cpu.items()},
        "process_cpu_s": {side: round(cpu_s, 2) for side, (cpu_s, _) in usage.items()},
        "peak_rss_mb": {side: round(rss, 1) for side, (_, rss) in usage.items()},
        "sent": sent,
        "received": got,
    }


def plain_aiortc(
    size_bytes: int, *, message_bytes: int = MESSAGE_BYTES, timeout: float | None = None
) -> dict[str, Any]:
    """``size_bytes`` over one plain aiortc data channel between two processes.

    Returns the figures of ``conclude`` (without the raw peer results) plus the
    sender's SCTP counts: ``sctp_data_chunks`` (DATA chunks sent, resends
    included), ``sctp_chunks_lost`` (chunks sent more than once) and
    ``sctp_resends`` (sends beyond each chunk's first); and ``udp_drops`` per
    side (datagrams the kernel dropped because the peer's UDP receive buffer
    was full).
    Raises BenchmarkError on any failure.
    """
    limit = default_timeout(size_bytes) if timeout is None else timeout
    deadline = time.monotonic() + limit + GRACE_S
    with peers("aiortc", size_bytes, message_bytes, limit) as (sender, receiver):
        receiver.send(sender.receive(deadline))  # offer
        sender.send(receiver.receive(deadline))  # answer
        figures = conclude(size_bytes, message_bytes, sender, receiver, deadline)
    sent, got = figures.pop("sent"), figures.pop("received")
    figures["sctp_data_chunks"] = sent["sctp_data_chunks"]
    figures["sctp_chunks_lost"] = sent["sctp_chunks_lost"]
    figures["sctp_resends"] = sent["sctp_resends"]
    figures["udp_drops"] = {"sender": sent["udp_drops"], "receiver": got["udp_drops"]}
    return figures


def libp2p_stream(
    size_bytes: int, *, message_bytes: int = MESSAGE_BYTES, timeout: float | None = None
) -> dict[str, Any]:
    """``size_bytes`` over one bare py-libp2p stream (Noise, yamux, TCP) between
    two processes, written in ``message_bytes`` pieces.

    Returns the figures of ``conclude`` (without the raw peer results); raises
    BenchmarkError on any failure.
    """
    limit = default_timeout(size_bytes) if timeout is None else timeout
    deadline = time.monotonic() + limit + GRACE_S
    with peers("libp2p", size_bytes, message_bytes, limit) as (sender, receiver):
        sender.send(receiver.receive(deadline))  # the listener's address
        figures = conclude(size_bytes, message_bytes, sender, receiver, deadline)
    del figures["sent"], figures["received"]
    return figures


# --- Pigeon ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``, all its threads (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int, key: str) -> float:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM) in MB of 10^6 bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024 / MB  # kB there means KiB
    raise BenchmarkError(f"/proc/{pid}/status has no {key}")


def reset_peak(pid: int) -> None:
    """Set process ``pid``'s VmHWM back to its present VmRSS (Linux 4.0 and later)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``: their SHA-256 (hex)."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        left = size
        while left:
            block = os.urandom(min(left, WRITE_BYTES))
            digest.update(block)
            file.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def pid(daemon: Daemon) -> int:
    if daemon.process is None or daemon.process.poll() is not None:
        raise BenchmarkError(f"daemon {daemon.name} is not running{log_tail(daemon)}")
    return daemon.process.pid


def log_tail(daemon: Daemon) -> str:
    try:
        lines = daemon.log.read_text(errors="replace").splitlines()[-LOG_LINES:]
    except OSError:
        return ""
    return "".join(f"\n  {daemon.name}: {line}" for line in lines)


def stop_all(daemons: list[Daemon]) -> list[str]:
    """Stop every daemon still running: what went wrong stopping them."""
    problems = []
    for daemon in daemons:
        if daemon.alive():
            try:
                daemon.stop()  # SIGTERM, then SIGKILL after 20 s
            except AssertionError as error:
                problems.append(str(error))
    return problems


@contextlib.contextmanager
def two_daemons(root: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """A sender and a receiver daemon, each the other's contact, stopped on the
    way out (a failure to stop is an error unless another one is under way)."""
    started: list[Daemon] = []
    try:
        try:
            sender = Daemon(root, "sender")
            started.append(sender.start())
            receiver = Daemon(root, "receiver", [sender.address])
            started.append(receiver.start())
            sender.cli("contacts", "add", receiver.id()["contact_code"], "--as", "receiver")
            receiver.cli("contacts", "add", sender.id()["contact_code"], "--as", "sender")
        except (AssertionError, subprocess.TimeoutExpired) as error:
            raise BenchmarkError(f"could not set up the daemons: {error}") from None
        yield sender, receiver
    except BaseException:
        stop_all(started)  # the first failure is the one to tell
        raise
    problems = stop_all(started)
    if problems:
        raise BenchmarkError("\n".join(problems))


def transfer_of(client: Client, transfer_id: str) -> dict[str, Any] | None:
    """The daemon's ``files.list`` entry for ``transfer_id``, if it has one."""
    files: list[dict[str, Any]] = client.request("files.list")["files"]
    return next((file for file in files if file["id"] == transfer_id), None)


def pigeon_transfer(
    size_bytes: int, *, timeout: float | None = None, rss_every: float | None = None
) -> dict[str, Any]:
    """``size_bytes`` of random bytes from one Pigeon daemon to another, offered,
    accepted into a fresh folder and hashed again here.

    Returns ``seconds`` and ``mb_s`` (from the accept to the receiver's "done"),
    ``first_bytes_s`` (from the accept to the first poll showing bytes received),
    ``cpu_s`` and ``cpu_s_per_mb`` of each daemon over that span,
    ``peak_rss_mb`` of each daemon over its life and ``transfer_peak_rss_mb``
    over that span, ``bytes_sent`` (by the sender, resends and authentication
    tags included) and, with ``rss_every``, ``rss_mb_samples``: [seconds since
    the accept, sender's VmRSS, receiver's VmRSS] every ``rss_every`` seconds.
    Raises BenchmarkError on any failure.
    """
    limit = default_timeout(size_bytes) if timeout is None else timeout
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        root = Path(tmp)
        source = root / "payload.bin"
        digest = random_file(source, size_bytes)
        with two_daemons(root) as (sender, receiver):
            try:
                figures = measure(sender, receiver, source, digest, limit, rss_every)
            except (BenchmarkError, PigeonError, OSError) as error:
                raise BenchmarkError(
                    f"Pigeon transfer: {error}{log_tail(sender)}{log_tail(receiver)}"
                ) from None
    return figures


def measure(
    sender: Daemon,
    receiver: Daemon,
    source: Path,
    digest: str,
    limit: float,
    rss_every: float | None,
) -> dict[str, Any]:
    """Offer ``source``, accept it and wait for it: the figures of pigeon_transfer."""
    size = source.stat().st_size
    with contextlib.closing(Client(sender.home, timeout=OFFER_S + size / HASH_RATE)) as client:
        # the sender reads and hashes the whole file before it answers
        offered = client.request("files.send", contact="receiver", path=str(source))
    transfer_id: str = offered["file"]["id"]
    daemons = {"sender": sender, "receiver": receiver}
    with contextlib.closing(Client(receiver.home)) as client:
        deadline = time.monotonic() + OFFER_S
        while transfer_of(client, transfer_id) is None:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the offer did not reach the receiver within {OFFER_S:.0f} s")
            time.sleep(POLL_S)
        before = {side: memory_mb(pid(daemon), "VmHWM") for side, daemon in daemons.items()}
        for daemon in daemons.values():
            reset_peak(pid(daemon))
        cpu = {side: cpu_seconds(pid(daemon)) for side, daemon in daemons.items()}
        start = time.monotonic()
        client.request("files.accept", id=transfer_id, to=str(source.parent / "received"))
        first_bytes: float | None = None
        samples: list[list[float]] = []
        next_sample = 0.0
        while True:
            file = transfer_of(client, transfer_id)
            now = time.monotonic() - start
            if file is None:
                raise BenchmarkError("the receiver forgot the transfer")
            if first_bytes is None and file["bytes_done"] > 0:
                first_bytes = now
            if file["state"] == "done":
                break
            if file["state"] in ENDED:
                raise BenchmarkError(f"the transfer ended {file['state']}: {file['error']}")
            if now > limit:
                raise BenchmarkError(
                    f"not done within {limit:.0f} s: {file['bytes_done']} of {size} bytes"
                )
            if rss_every is not None and now >= next_sample:
                rss = [memory_mb(pid(daemon), "VmRSS") for daemon in daemons.values()]
                samples.append([round(now, 1), *(round(mb, 1) for mb in rss)])
                next_sample = now + rss_every
            time.sleep(POLL_S)
        assert first_bytes is not None  # "done" shows every byte, and there is at least one
        used = {side: cpu_seconds(pid(daemon)) - cpu[side] for side, daemon in daemons.items()}
        peak = {side: memory_mb(pid(daemon), "VmHWM") for side, daemon in daemons.items()}
    with contextlib.closing(Client(sender.home)) as client:
        sent = transfer_of(client, transfer_id)
    if sent is None:
        raise BenchmarkError("the sender forgot the transfer")
    got = file_sha256(Path(file["path"]))
    if got != digest:
        raise BenchmarkError(f"the received file hashes to {got}, the one sent to {digest}")
    figures: dict[str, Any] = {
        "size_bytes": size,
        "seconds": round(now, 3),
        "mb_s": round(size / MB / now, 2),
        "first_bytes_s": round(first_bytes, 2),
        "cpu_s": {side: round(value, 2) for side, value in used.items()},
        "cpu_s_per_mb": {side: round(value / (size / MB), 4) for side, value in used.items()},
        "peak_rss_mb": {side: round(max(before[side], peak[side]), 1) for side in daemons},
        "transfer_peak_rss_mb": {side: round(value, 1) for side, value in peak.items()},
        "bytes_sent": sent["bytes_sent"],
    }
    if rss_every is not None:
        figures["rss_mb_samples"] = samples
    return figures


def summary(
    size_mb: float,
    pigeon: dict[str, Any] | None,
    aiortc: dict[str, Any] | None,
    libp2p: dict[str, Any] | None,
) -> dict[str, Any]:
    """The one JSON line of ``--json``: the figures of whatever was measured."""
    result: dict[str, Any] = {}
    if pigeon is not None:
        result["pigeon_mb_s"] = pigeon["mb_s"]
    if aiortc is not None:
        result["baseline_mb_s"] = aiortc["mb_s"]
    if pigeon is not None and aiortc is not None:
        result["ratio"] = round(pigeon["mb_s"] / aiortc["mb_s"], 3)
    if pigeon is not None:
        result["cpu_s_per_mb"] = pigeon["cpu_s_per_mb"]
        result["peak_rss_mb"] = pigeon["peak_rss_mb"]
        result["transfer_peak_rss_mb"] = pigeon["transfer_peak_rss_mb"]
    if aiortc is not None:
        result["baseline_cpu_s_per_mb"] = aiortc["cpu_s_per_mb"]
        result["baseline_peak_rss_mb"] = aiortc["peak_rss_mb"]
    if libp2p is not None:
        result["libp2p_stream_mb_s"] = libp2p["mb_s"]
    result["size_mb"] = size_mb
    if pigeon is not None:
        result["pigeon_seconds"] = pigeon["seconds"]
        result["pigeon_first_bytes_s"] = pigeon["first_bytes_s"]
        result["pigeon_bytes_sent"] = pigeon["bytes_sent"]
        if "rss_mb_samples" in pigeon:
            result["rss_mb_samples"] = pigeon["rss_mb_samples"]
    return result


def show(name: str, figures: dict[str, Any]) -> None:
    cpu, rss = figures["cpu_s_per_mb"], figures["peak_rss_mb"]
    print(
        f"{name:14} {figures['mb_s']:8.2f} MB/s  CPU s/MB sender {cpu['sender']:.4f}"
        f" receiver {cpu['receiver']:.4f}  peak RSS MB {rss['sender']} / {rss['receiver']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Without --baseline-only or --no-baseline: Pigeon and both baselines.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--baseline-only", action="store_true", help="measure the baselines alone")
    which.add_argument(
        "--no-baseline", action="store_true", help="measure Pigeon alone (for long runs)"
    )
    parser.add_argument("--size-mb", type=float, default=100.0, help="MB of 10^6 bytes")
    parser.add_argument(
        "--rss-every",
        type=float,
        metavar="SECONDS",
        help="also sample both daemons' VmRSS (MB) this often during the transfer",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    size = round(args.size_mb * MB)
    if size <= 0:
        parser.error("--size-mb must be more than 0")
    if args.rss_every is not None and (args.baseline_only or args.rss_every <= 0):
        parser.error("--rss-every takes a positive number of seconds, and Pigeon's transfer")
    try:
        pigeon = None if args.baseline_only else pigeon_transfer(size, rss_every=args.rss_every)
        aiortc = None if args.no_baseline else plain_aiortc(size)
        libp2p = None if args.no_baseline else libp2p_stream(size)
    except BenchmarkError as error:
        print(f"transfer benchmark failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary(args.size_mb, pigeon, aiortc, libp2p)))
        return 0
    print(f"{args.size_mb:g} MB, SHA-256 verified")
    if pigeon is not None:
        show("Pigeon", pigeon)
        print(
            f"{'':14} first bytes {pigeon['first_bytes_s']} s after the accept,"
            f" {pigeon['bytes_sent']} bytes sent"
        )
        for seconds, sender_mb, receiver_mb in pigeon.get("rss_mb_samples", []):
            print(f"{'':14} at {seconds:7.1f} s VmRSS MB {sender_mb} / {receiver_mb}")
    if aiortc is None or libp2p is None:
        return 0
    show("plain aiortc", aiortc)
    show("libp2p stream", libp2p)
    if pigeon is not None:
        print(f"Pigeon / plain aiortc: {pigeon['mb_s'] / aiortc['mb_s']:.2f}")
    chunks = aiortc["sctp_data_chunks"]
    print(
        f"aiortc ({MESSAGE_BYTES // 1024} KiB messages) SCTP: {chunks} DATA chunks sent,"
        f" {aiortc['sctp_chunks_lost']} lost (UDP drops {aiortc['udp_drops']}),"
        f" {aiortc['sctp_resends']} resent ({aiortc['sctp_resends'] / chunks:.1%} of all sends)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
