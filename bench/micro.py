"""
Micro-benchmarks of single per-message costs, old way against new way, side
by side in one process (alternating, medians), so that a change too small
for the end-to-end benchmark's noise (10-30 % between runs on a shared
machine) is still measured.

  - handoff: the reactor thread's cost of running one small job in a thread
    and getting its result back: Twisted's deferToThreadPool against the
    spool's ThreadRunner.  64 jobs at a time (as many as the s64 scenario's
    sessions), microseconds of CPU of the whole process per job.
  - logline: one text log line of the relay's commonest event ("accepted
    ... from ..."): Twisted's formatEventAsClassicLogText against
    logformat.classicLogText, microseconds per line.
  - envelope: a worker's two uses of one envelope's JSON (its spool file,
    then the channel to the main process): encoded twice against once,
    microseconds per message.

Usage (repository root): python bench/micro.py [--repeat 7] [--name NAME]
writes bench/results/NAME.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.threads import deferToThreadPool  # noqa: E402
from twisted.logger import LogLevel, formatEventAsClassicLogText  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from smtpauth_relay.envelope import Envelope  # noqa: E402
from smtpauth_relay.logformat import cachedFormatTime, classicLogText  # noqa: E402
from smtpauth_relay.threads import ThreadRunner  # noqa: E402

JOBS = 20_000
CONCURRENT = 64
LINES = 50_000
ENVELOPES = 20_000


def job() -> int:
    return os.getpid()


async def handoff(run: Callable[..., defer.Deferred[Any]]) -> float:
    """
    Microseconds of CPU (whole process: reactor thread and pool threads)
    per job, C{CONCURRENT} waiting at a time.
    """
    start = time.process_time()
    for _ in range(JOBS // CONCURRENT):
        await defer.gatherResults([run(job) for _ in range(CONCURRENT)])
    return (time.process_time() - start) * 1e6 / JOBS


def logEvent(i: int) -> dict[str, Any]:
    return {
        "log_format": "accepted {queueId} from {peer}: size={size}"
        " sender=<{sender}> recipients={recipientCount} user={user}",
        "queueId": f"{i:016X}",
        "peer": "127.0.0.1",
        "size": 2311,
        "sender": "bench@example.org",
        "recipientCount": 1,
        "user": "bench",
        "log_namespace": "smtpauth_relay.server",
        "log_level": LogLevel.info,
        "log_time": 1_800_000_000 + i / 1000,
        "log_system": "RelayESMTP,17,127.0.0.1",
    }


def logline(format: Callable[[dict[str, Any]], str | None]) -> float:
    """
    Microseconds per line.
    """
    events = [logEvent(i) for i in range(LINES)]
    start = time.process_time()
    for event in events:
        format(event)
    return (time.process_time() - start) * 1e6 / LINES


def envelopes(cached: bool) -> float:
    """
    Microseconds per message for its JSON used twice: with L{Envelope.toJSON}
    keeping it, or encoded each time (as before).
    """
    made = [
        Envelope(
            queueId=f"{i:016X}",
            sender="bench@example.org",
            recipients=("sink@example.net",),
            authUser="bench",
            clientAddress="127.0.0.1",
            helo="loadgen",
            receivedAt=1_800_000_000.0 + i,
            size=2311,
        )
        for i in range(ENVELOPES)
    ]
    start = time.process_time()
    for envelope in made:
        if cached:
            envelope.toJSON()
            envelope.toJSON()
        else:
            envelope._encode()
            envelope._encode()
    return (time.process_time() - start) * 1e6 / ENVELOPES


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="twisted")
    pool.start()
    runner = ThreadRunner(reactor, "runner", 4)
    timeOf = cachedFormatTime()
    ours = classicLogText(timeOf)

    def viaPool(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, pool, f, *args)

    def theirs(event: dict[str, Any]) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=timeOf)

    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "handoff_twisted",
            "handoff_runner",
            "logline_twisted",
            "logline_ours",
            "envelope_twice",
            "envelope_once",
        )
    }
    try:
        for i in range(args.repeat):
            # Alternate which goes first.
            pairs: list[tuple[str, Any]] = [
                (
                    "handoff_twisted",
                    lambda: handoff(viaPool),
                ),
                ("handoff_runner", lambda: handoff(runner)),
            ]
            for name, measure in pairs if i % 2 == 0 else pairs[::-1]:
                samples[name].append(await measure())
            for name, f in [("logline_twisted", theirs), ("logline_ours", ours)]:
                samples[name].append(logline(f))
            samples["envelope_twice"].append(envelopes(cached=False))
            samples["envelope_once"].append(envelopes(cached=True))
    finally:
        pool.stop()
        runner.stop()
    return {name: median(xs) for name, xs in samples.items()} | {"runs": samples}


def report(results: dict[str, Any]) -> str:
    rows = [
        (
            "thread hand-off, µs of CPU per job (whole process)",
            "handoff_twisted",
            "handoff_runner",
            "deferToThreadPool",
            "ThreadRunner",
        ),
        (
            "text log line, µs",
            "logline_twisted",
            "logline_ours",
            "formatEventAsClassicLogText",
            "classicLogText",
        ),
        (
            "envelope JSON for spool + channel, µs",
            "envelope_twice",
            "envelope_once",
            "encoded twice",
            "encoded once",
        ),
    ]
    out = ["| cost | before | after | after / before |", "|---|---|---|---|"]
    for label, old, new, oldName, newName in rows:
        a, b = results[old], results[new]
        out.append(f"| {label} | {a} ({oldName}) | {b} ({newName}) | {b / a:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--name", default=time.strftime("%Y-%m-%d-%H%M-micro"))
    args = p.parse_args()
    outcome: dict[str, Any] = {}

    async def go() -> None:
        try:
            outcome.update(await main(args))
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()))
    reactor.run()
    outcome["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    outcome["loadavg"] = os.getloadavg()
    path = os.path.join(HERE, "results", f"{args.name}.json")
    with open(path, "w") as f:
        json.dump(outcome, f, indent=1)
    print(report(outcome))
    print(f"written {path}")
