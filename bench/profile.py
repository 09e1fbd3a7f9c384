"""
Profile smtpauth-relay under a benchmark load with py-spy, and summarise.

Starts the counting sink and our relay exactly as bench/run.py does (same
configuration, a snapshot of this checkout), attaches C{py-spy record} to
the relay's process, drives one scenario with bench/loadgen.py, and writes:

  - NAME.raw: py-spy's collapsed stacks (one "frame;frame;... count" a line,
    leaf last), for flame graphs (flamegraph.pl, speedscope.app);
  - NAME.txt: a summary: samples by category (TLS, SMTP line parsing,
    fsync, spool write, trace headers, envelope JSON, delivery client,
    logging, password checks, reactor wait, ...), the top functions by own
    time and by inclusive time.

A sample's category is that of the innermost frame that matches one (a
logging call inside the delivery client counts as logging; OpenSSL under a
reply written by the server counts as TLS).

py-spy is not a dependency of the project: /work/venv/bin/pip install py-spy.

Usage (repository root, as root so that py-spy may attach):
  /work/venv/bin/python bench/profile.py --scenario s64 \\
      --output bench/results/2026-11-28-profile-s64
  /work/venv/bin/python bench/profile.py --summarise FILE.raw   # again
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402

#: (category, pattern on one frame), the first match wins for a frame.
CATEGORIES: tuple[tuple[str, str], ...] = (
    (
        "password check (sha512-crypt)",
        r"passwords\.py|checkers\.py|logincache\.py|bcrypt",
    ),
    ("fsync", r"\bfsync\b|fsyncDirectory|fdatasync"),
    (
        "TLS (OpenSSL, pyOpenSSL, twisted tls)",
        r"libssl|libcrypto|OpenSSL/|SSL_|ssl3_|tls13_|EVP_|ossl_|protocols/tls\.py|"
        r"_sslverify|cryptography/",
    ),
    ("logging", r"twisted/logger/|twisted/python/log\.py|logformat\.py"),
    ("trace / Received header", r"smtpauth_relay/trace\.py"),
    ("envelope JSON", r"smtpauth_relay/envelope\.py|json/"),
    ("spool (write, commit, rename)", r"smtpauth_relay/spool\.py"),
    ("delivery client / queue runner", r"smtpauth_relay/delivery/|retry\.py"),
    ("metrics", r"smtpauth_relay/metrics\.py|prometheus_client"),
    (
        "SMTP server: line parsing, commands, DATA",
        r"smtpauth_relay/server\.py|smtpauth_relay/submission\.py|mail/smtp\.py|"
        r"protocols/basic\.py",
    ),
    ("limits / lockout / policy", r"limits\.py|lockout\.py|policy\.py|senders\.py"),
    (
        "thread pool hand-off",
        r"threadpool\.py|_threads/|threading\.py|queue\.py|smtpauth_relay/threads\.py",
    ),
    ("Deferred machinery", r"internet/defer\.py"),
    (
        "socket I/O (kernel send/recv)",
        r"\b(send|recv|sendmsg|__libc_send|__libc_recv)\b",
    ),
    (
        "reactor (epoll, dispatch)",
        r"epollreactor|posixbase|selectreactor|\bepoll_wait\b",
    ),
)
_COMPILED = [(name, re.compile(p)) for name, p in CATEGORIES]


def parse(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """
    py-spy's collapsed stacks.  With C{--subprocesses} each stack starts
    with its process's command line, which for a worker holds newlines (its
    bootstrap code): a line not ending in a count goes on in the next.
    """
    stacks = []
    pending = ""
    for line in lines:
        line = pending + line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            pending = line + " "
            continue
        pending = ""
        stacks.append((stack.split(";"), int(count)))
    return stacks


#: A thread waiting for work or for events (py-spy --native or --idle
#: samples these too): not CPU.
IDLE = re.compile(
    r"^Queue\.get \(queue\.py|^epoll_wait|^EPollReactor\.doPoll .*epollreactor"
)


def categorise(frames: list[str]) -> str:
    if any(IDLE.search(frame) for frame in frames[-12:]) and not any(
        re.search(r"\(smtpauth_relay/|OpenSSL|libssl|libcrypto", frame)
        for frame in frames[-12:]
    ):
        return "idle (waiting for work or events)"
    for frame in reversed(frames):
        for name, pattern in _COMPILED:
            if pattern.search(frame):
                return name
    return "other"


def summarise(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    categories: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    idle = 0
    for frames, count in stacks:
        category = categorise(frames)
        if category.startswith("idle"):
            idle += count
            continue
        categories[category] += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    total = sum(categories.values()) or 1
    out = [
        f"busy samples: {total} (idle samples left out: {idle});"
        " percentages of busy samples",
        "",
        "By category (innermost matching frame):",
    ]
    for name, n in categories.most_common():
        out.append(f"  {pct(n)}  {name}")
    out += ["", f"Top {top} by own time (leaf frame):"]
    for frame, n in own.most_common(top):
        out.append(f"  {pct(n)}  {frame}")
    out += ["", f"Top {top} by inclusive time:"]
    for frame, n in inclusive.most_common(top + 10)[: top + 10]:
        out.append(f"  {pct(n)}  {frame}")
    return "\n".join(out) + "\n"


def profile(args: argparse.Namespace) -> None:
    scenario = run.SCENARIOS[args.scenario]
    snapshot, source = run.snapshotSource(run.ROOT)
    work = tempfile.mkdtemp(prefix="bench-profile-")
    os.chmod(work, 0o755)
    sinkPort = run.freePort()
    countFile = f"{work}/sink.count"
    sink = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "sink.py"),
            "--port",
            str(sinkPort),
            "--count-file",
            countFile,
        ]
    )
    relay = run.Relay("relay", work, sinkPort)
    relay.source = snapshot
    spy = None
    try:
        run.waitPort(sinkPort)
        relay.start()
        time.sleep(1.0)
        command = [
            os.path.join(os.path.dirname(sys.executable), "py-spy"),
            "record",
            "--pid",
            str(relay.process.pid),
            "--format",
            "raw",
            "--rate",
            str(args.rate),
            "--output",
            args.output + ".raw",
            # The worker processes ([server] workers) too.
            "--subprocesses",
        ]
        if args.native:
            command.append("--native")
        if args.idle:
            command.append("--idle")
        if args.gil:
            command.append("--gil")
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        started = time.perf_counter()
        gen = subprocess.run(
            run.loadgenCommand(
                relay,
                "--sessions",
                str(scenario.sessions),
                "--messages",
                str(args.messages or scenario.messages),
                "--per-session",
                str(scenario.perSession),
                "--size",
                str(scenario.size),
            ),
            capture_output=True,
            text=True,
            timeout=900,
        )
        load = json.loads(gen.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 120
        while (
            run.sinkState(countFile)[1] < load["accepted"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        load["delivered"] = run.sinkState(countFile)[1]
        load["delivered_seconds"] = round(time.perf_counter() - started, 2)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        relay.stop()
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(snapshot, ignore_errors=True)
    with open(args.output + ".raw") as f:
        summary = summarise(parse(f))
    header = (
        f"py-spy record --rate {args.rate}{' --native' if args.native else ''}"
        f"{' --idle' if args.idle else ''}{' --gil' if args.gil else ''}"
        " of smtpauth-relay, scenario "
        f"{args.scenario} ({scenario.description}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()}\n"
        f"code: {json.dumps(source)}\nload: {json.dumps(load)}\n\n"
    )
    with open(args.output + ".txt", "w") as f:
        f.write(header + summary)
    sys.stdout.write(header + summary)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="s64", choices=sorted(run.SCENARIOS))
    p.add_argument("--messages", type=int, default=0, help="instead of the scenario's")
    p.add_argument("--rate", type=int, default=100, help="samples per second")
    p.add_argument("--native", action="store_true", help="C frames too (OpenSSL)")
    p.add_argument("--idle", action="store_true", help="idle threads too")
    p.add_argument(
        "--gil",
        action="store_true",
        help="only samples holding the GIL (Python CPU; no fsync waits, no OpenSSL)",
    )
    p.add_argument("--output", default=f"/tmp/profile-{os.getpid()}")
    p.add_argument("--summarise", metavar="RAW", help="only summarise a .raw file")
    args = p.parse_args()
    if args.summarise:
        with open(args.summarise) as f:
            sys.stdout.write(summarise(parse(f)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profile(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
