"""
Side-by-side benchmark runner: smtpauth-relay and Postfix, on the same
machine, in one run, under the same load.

For each scenario and each repetition it starts a fresh counting sink
(bench/sink.py) and a fresh relay (ours from a snapshot of this checkout,
smarthost mode to the sink; or Postfix + Dovecot SASL through
../shared/peers/postfix-relay.sh, relayhost = the sink), drives it with
bench/loadgen.py (AUTH PLAIN over STARTTLS), and measures:

  - accepted/s and accept latency (p50, p99) at the load generator;
  - delivered/s: distinct messages at the sink divided by the time from the
    start of the load until the last one arrived there;
  - CPU seconds per 1,000 messages of all the relay's processes (from
    /proc: live descendants of the roots plus what exited children left in
    their parents' cutime/cstime), from the start of the load until all
    were delivered;
  - peak RSS (sum of VmHWM over the relay's processes, reset at the start
    of the load) and the peak of the summed PSS, sampled every 0.25 s;
  - in the idle scenario, memory per held authenticated session (PSS
    summed over the relay's processes, at half and at all the sessions);
  - lost and duplicated messages, and refusals or errors in the relay's
    log (ours: relay.log; Postfix: maillog and dovecot.log).

Targets alternate within each repetition (and the order flips on every
repetition), so slow phases of a shared machine hit both.  Results: the
median of the repetitions, written to bench/results/NAME.json, and a
Markdown table on stdout.

Usage (repository root):
  /work/venv/bin/python bench/run.py --targets relay,postfix --repeat 3 \\
      --scenarios s8,s64,large,one,huge,idle --name 2026-11-28-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from smtpauth_relay.demo import twistdCommand  # noqa: E402
from smtpauth_relay.htpasswd import setUser  # noqa: E402
from smtpauth_relay.passwords import sha512Crypt  # noqa: E402
from smtpauth_relay.tls import generateSelfSigned  # noqa: E402

PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")
USER, PASSWORD = "bench", "secret"
TICKS = os.sysconf("SC_CLK_TCK")
SALT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Scenario:
    name: str
    sessions: int
    messages: int
    size: int = 2048
    perSession: int = 10
    idle: int = 0
    handshakes: int = 0
    description: str = ""


SCENARIOS = {
    "s8": Scenario("s8", 8, 2000, description="8 sessions, 2 KB"),
    "s64": Scenario("s64", 64, 4000, description="64 sessions, 2 KB"),
    "sustained": Scenario(
        "sustained", 64, 20000, description="64 sessions, 2 KB, 20,000 messages"
    ),
    "large": Scenario(
        "large", 64, 1000, size=100_000, description="64 sessions, 100 KB"
    ),
    "one": Scenario(
        "one",
        64,
        1000,
        perSession=1,
        description="64 sessions, 1 message per TLS session",
    ),
    "huge": Scenario(
        "huge", 8, 16, size=5_000_000, perSession=2, description="5 MB, 8 at once"
    ),
    "idle": Scenario(
        "idle", 0, 0, idle=1000, description="idle authenticated sessions"
    ),
    "resume": Scenario(
        "resume",
        8,
        0,
        handshakes=2000,
        description="implicit TLS handshakes, 8 at once: new vs resumed session",
    ),
}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitPort(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.05)


# -- /proc accounting ------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int, int] | None:
    """
    (ppid, own CPU ticks, reaped children's CPU ticks, of which in the
    kernel: own stime + cstime) of C{pid}.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields[0] is the state (field 3 of proc(5)): utime 14, stime 15,
    # cutime 16, cstime 17.
    return (
        int(fields[1]),
        int(fields[11]) + int(fields[12]),
        int(fields[13]) + int(fields[14]),
        int(fields[12]) + int(fields[14]),
    )


def processTree(roots: list[int]) -> list[int]:
    """
    C{roots} and all their live descendants.
    """
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents[int(name)] = st[0]
    tree = {r for r in roots if r in parents}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return sorted(tree)


def cpuSeconds(roots: list[int]) -> tuple[float, float]:
    """
    CPU of the live tree under C{roots} plus what its exited (and reaped)
    children left in the cutime/cstime of their parents in the tree.  Taken
    before and after a run, the difference is the tree's CPU during the
    run, including processes born and gone in between (Postfix's smtpd,
    cleanup, smtp, ...): a child's CPU moves from its own counters into
    its parent's cutime when it is reaped.
    """
    total = system = 0
    for pid in processTree(roots):
        st = _stat(pid)
        if st is not None:
            total += st[1] + st[2]
            system += st[3]
    return total / TICKS, system / TICKS


def machineSeconds() -> tuple[float, float]:
    """
    CPU seconds all cores have spent since boot (/proc/stat) in processes
    (user, nice, system) and in interrupts (irq, softirq: loopback TCP is
    processed there, and it is charged to no process).
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is in user)
    return (v[0] + v[1] + v[2]) / TICKS, (v[5] + v[6]) / TICKS


def _statusValue(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def pssOf(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def memory(roots: list[int]) -> dict[str, int]:
    """
    Sums over the tree under C{roots}, in bytes: PSS, RSS, peak RSS
    (VmHWM, since the last L{resetPeaks}), and the number of processes.
    """
    tree = processTree(roots)
    return {
        "pss": pssOf(tree),
        "rss": sum(_statusValue(pid, "VmRSS:") for pid in tree),
        "hwm": sum(_statusValue(pid, "VmHWM:") for pid in tree),
        "processes": len(tree),
    }


def resetPeaks(roots: list[int]) -> None:
    """
    Reset VmHWM of every process in the tree (clear_refs 5; needs root).
    """
    for pid in processTree(roots):
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


class PeakSampler(threading.Thread):
    """
    Samples the tree's summed PSS every C{interval} seconds and keeps the
    largest.
    """

    def __init__(self, roots: list[int], interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.interval = interval
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, pssOf(processTree(self.roots)))
            self.stopped.wait(self.interval)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak


# -- the code under test -------------------------------------------------------


def snapshotSource(root: str) -> tuple[str, dict[str, Any]]:
    """
    Copy the relay's code (smtpauth_relay/, twisted/plugins/) out of the
    checkout, so that every repetition runs the same code even while the
    working tree is being edited; return the copy and a description of it.
    """
    target = tempfile.mkdtemp(prefix="bench-src-")
    for name in ("smtpauth_relay", "twisted"):
        shutil.copytree(
            os.path.join(root, name),
            os.path.join(target, name),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache"),
        )

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "smtpauth_relay", "twisted")
    import hashlib  # noqa: PLC0415

    return target, {
        "commit": git("rev-parse", "HEAD"),
        "subject": git("log", "-1", "--format=%s")[:100],
        "dirty_files": git(
            "diff", "HEAD", "--name-only", "--", "smtpauth_relay", "twisted"
        ).split(),
        "dirty_diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else "",
        "snapshot": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def exportCommit(root: str, commit: str) -> tuple[str, dict[str, Any]]:
    """
    Export the relay's code (smtpauth_relay/, twisted/plugins/) as of
    C{commit} into a new directory; return it and a description.
    """
    target = tempfile.mkdtemp(prefix="bench-base-")
    archive = subprocess.run(
        ["git", "archive", commit, "smtpauth_relay", "twisted"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    return target, {
        "commit": git("rev-parse", commit),
        "subject": git("log", "-1", "--format=%s", commit)[:100],
    }


# -- targets -----------------------------------------------------------------


@dataclass
class Target(ABC):
    name: str
    work: str
    sinkPort: int
    port: int = field(default_factory=freePort)
    tlsPort: int = field(default_factory=freePort)
    roots: list[int] = field(default_factory=list)

    @abstractmethod
    def start(self) -> None:
        """
        Start the relay; set C{roots} to its process ids.
        """

    @abstractmethod
    def stop(self) -> None:
        """
        Stop the relay and wait for its processes.
        """

    def anomalies(self) -> dict[str, int]:
        """
        Log lines that are neither the normal traffic nor start-up and
        shut-down, normalised and counted.
        """
        return {}


def _normalise(line: str) -> str:
    line = re.sub(r"^\S+ \[[^]]*\] ", "", line)  # twistd prefix
    line = re.sub(r"^\w{3} +\d+ [\d:]+ \S+ \S+: ", "", line)  # syslog prefix
    line = re.sub(r"\b[0-9A-F]{10,}\b", "QID", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line.strip()[:160]


def _countLines(path: str, normal: re.Pattern[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.strip() and not normal.search(line):
                    counts[_normalise(line)] += 1
    except FileNotFoundError:
        pass
    return dict(counts.most_common(12))


class Relay(Target):
    """
    smtpauth-relay from the snapshot of this checkout, smarthost mode to
    the sink, with the default durability (the message and its envelope
    fsynced before the 250).
    """

    source: str = ROOT
    workers = '"auto"'
    """C{[server] workers}: one process per core."""

    NORMAL = re.compile(
        r"accepted [0-9A-F]+ from |delivered to <|AUTH PLAIN ok for"
        r"|closed after [\d.]+s: tls=True user=bench accepted=\d+ errors=0"
        r"|closed after [\d.]+s: tls=\w+ user=None accepted=0 errors=0$"
        r"|starting up|reactor class|listening on|Starting factory|Stopping factory"
        r"|starting on \d+|Received SIG|Main loop terminated|Server Shut Down"
        r"|Loaded \d+ users from|ControlFactory starting on|Port .* Closed\)"
        r"|Channel connection (established|lost)|started worker \d+"
        r"|worker \d+ (running|stopped|ready)"
    )

    def start(self) -> None:
        w = self.work
        generateSelfSigned(f"{w}/cert.pem", f"{w}/key.pem", "localhost")
        # sha512-crypt with the default 5,000 rounds: the scheme and cost of
        # the Postfix peer's Dovecot passwd-file (glibc crypt there, this
        # project's own implementation here).
        salt = "".join(secrets.choice(SALT_ALPHABET) for _ in range(16))
        setUser(f"{w}/users", USER, sha512Crypt(PASSWORD.encode(), "$6$" + salt))
        server = [
            'hostname = "relay.bench"',
            "max_connections = 20000",
            "max_connections_per_ip = 20000",
            "max_message_size = 52428800",
            f"workers = {os.environ.get('BENCH_WORKERS', self.workers)}",
        ]
        serverText = "\n".join(server)
        with open(f"{w}/relay.toml", "w") as f:
            f.write(
                f"""
[server]
{serverText}
[tls]
certificate = "cert.pem"
private_key = "key.pem"
[[listener]]
endpoint = "tcp:port={self.port}:interface=127.0.0.1:backlog=1024"
tls = "starttls"
[[listener]]
endpoint = "tcp:port={self.tlsPort}:interface=127.0.0.1:backlog=1024"
tls = "implicit"
[auth]
checkers = ["htpasswd:{w}/users"]
# One user from one address sends thousands of messages a minute: the
# per-user and per-address limits (default 200 messages an hour, 60
# connections a minute, ...) are switched off, as the Postfix peer's are.
[limits]
messages_per_hour = 0
recipients_per_hour = 0
connections_per_minute = 0
messages_per_session = 0
[queue]
directory = "spool"
retry_schedule = [1]
[delivery]
mode = "smarthost"
host = "127.0.0.1"
port = {self.sinkPort}
tls = "none"
# As many connections to the next hop as Postfix opens by default
# (default_destination_concurrency_limit = 20).
max_per_destination = 20
"""
            )
        env = dict(os.environ, PYTHONPATH=self.source)
        self.log = open(f"{w}/relay.log", "wb")
        self.process = subprocess.Popen(
            twistdCommand(
                ["-n", "--pidfile=", "smtpauth-relay", "--config", f"{w}/relay.toml"]
            ),
            cwd=w,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.roots = [self.process.pid]
        try:
            waitPort(self.port)
            waitPort(self.tlsPort)
        except RuntimeError:
            self.stop()
            with open(f"{w}/relay.log", errors="replace") as f:
                sys.stderr.write(f.read()[-3000:])
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def anomalies(self) -> dict[str, int]:
        return _countLines(f"{self.work}/relay.log", self.NORMAL)


class Postfix(Target):
    """
    Postfix 3.7 + Dovecot SASL through the shared peer script (its default
    durability: cleanup fsyncs the queue file before smtpd answers 250).
    The roots are Postfix's master and Dovecot's master; every smtpd,
    cleanup, qmgr, smtp, trivial-rewrite, anvil and Dovecot auth process
    is their descendant.
    """

    NORMAL = re.compile(
        r"postfix/smtpd\[\d+\]: (connect from|disconnect from|[0-9A-F]+: client=)"
        r"|postfix/cleanup\[\d+\]: [0-9A-F]+: message-id="
        r"|postfix/qmgr\[\d+\]: [0-9A-F]+: (from=|removed)"
        r"|postfix/smtp\[\d+\]: [0-9A-F]+: to=.* status=sent"
        r"|daemon started|starting the Postfix|terminating on signal"
        r"|postfix/postlogd|postfix-script"
        # run.py's own probes of the port
        r"|lost connection after CONNECT from unknown"
    )

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            BENCH_LISTEN_PORT=str(self.port),
            BENCH_TLS_PORT=str(self.tlsPort),
            BENCH_SINK_PORT=str(self.sinkPort),
            BENCH_USER=USER,
            BENCH_PASS=PASSWORD,
            BENCH_CERT=f"{self.work}/cert.pem",
            BENCH_KEY=f"{self.work}/key.pem",
            BENCH_WORKDIR=f"{self.work}/postfix",
        )

    def start(self) -> None:
        generateSelfSigned(f"{self.work}/cert.pem", f"{self.work}/key.pem", "localhost")
        os.chmod(self.work, 0o755)
        done = subprocess.run(
            [os.path.join(PEERS, "postfix-relay.sh"), "start"],
            env=self.env(),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            sys.stderr.write(done.stdout + done.stderr)
            self.stop()
            raise RuntimeError("postfix-relay.sh start failed")
        self.roots = [
            int(line.split("=", 1)[1])
            for line in done.stdout.splitlines()
            if line.startswith("PID=") and line.split("=", 1)[1].strip().isdigit()
        ]
        waitPort(self.port)

    def stop(self) -> None:
        tree = processTree(self.roots)
        subprocess.run(
            [os.path.join(PEERS, "postfix-relay.sh"), "stop"],
            env=self.env(),
            capture_output=True,
        )
        # The next measurement must not share the CPU with lingering
        # children of this instance.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
            os.path.exists(f"/proc/{pid}") for pid in tree
        ):
            time.sleep(0.1)

    def anomalies(self) -> dict[str, int]:
        found = _countLines(f"{self.work}/postfix/maillog", self.NORMAL)
        found.update(
            {
                "dovecot: " + k: v
                for k, v in _countLines(
                    f"{self.work}/postfix/dovecot/dovecot.log",
                    re.compile(r"Info: |^\s*$|Killed with signal 15"),
                ).items()
            }
        )
        return found


class Relay1(Relay):
    """
    The same relay in one process (C{[server] workers = 1}).
    """

    workers = "1"


class Base(Relay):
    """
    Ours from another tree (C{--base DIR}: an export of an earlier commit),
    configured as L{Relay}: a change measured against what it changes, in
    the same run.
    """


TARGETS: dict[str, type[Target]] = {
    "relay": Relay,
    "relay1": Relay1,
    "base": Base,
    "postfix": Postfix,
}


# -- one measurement ---------------------------------------------------------


def sinkState(path: str) -> tuple[int, int, int, float]:
    """
    (messages, distinct Message-IDs, connections, sink CPU seconds).
    """
    try:
        with open(path) as f:
            m, u, c, cpu = f.read().split()
        return int(m), int(u), int(c), float(cpu)
    except (FileNotFoundError, ValueError):
        return 0, 0, 0, 0.0


def loadgenCommand(target: Target, *args: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(HERE, "loadgen.py"),
        "--port",
        str(target.port),
        "--user",
        USER,
        "--password",
        PASSWORD,
        *args,
    ]


def measure(
    targetClass: type[Target], scenario: Scenario, options: argparse.Namespace
) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix=f"bench-{targetClass.__name__.lower()}-")
    os.chmod(work, 0o755)
    sinkPort = freePort()
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
    target = targetClass(targetClass.__name__.lower(), work, sinkPort)
    if isinstance(target, Base):
        if not options.base:
            raise SystemExit("the base target needs --base DIR")
        target.source = options.base
    elif isinstance(target, Relay):
        target.source = options.source
    started = False
    result: dict[str, Any] = {}
    try:
        waitPort(sinkPort)
        target.start()
        started = True
        time.sleep(1.0)
        if scenario.idle:
            result = measureIdle(target, scenario)
        elif scenario.handshakes:
            result = measureHandshakes(target, scenario)
        else:
            result = measureLoad(target, scenario, countFile)
    finally:
        if started:
            target.stop()
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
        if started:
            result["anomalies"] = target.anomalies()
        if options.keep:
            result["work"] = work
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def measureLoad(target: Target, scenario: Scenario, countFile: str) -> dict[str, Any]:
    resetPeaks(target.roots)
    before = memory(target.roots)
    sampler = PeakSampler(target.roots)
    sampler.start()
    sinkCpu0 = sinkState(countFile)[3]
    cpu0, system0 = cpuSeconds(target.roots)
    busy0, irq0 = machineSeconds()
    started = time.perf_counter()
    gen = subprocess.run(
        loadgenCommand(
            target,
            "--sessions",
            str(scenario.sessions),
            "--messages",
            str(scenario.messages),
            "--per-session",
            str(scenario.perSession),
            "--size",
            str(scenario.size),
        ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if gen.returncode:
        sampler.stop()
        raise RuntimeError(f"loadgen failed: {gen.stderr[-2000:]}")
    load = json.loads(gen.stdout.strip().splitlines()[-1])
    # Wait until every accepted message is at the sink, or nothing more
    # arrives for 30 s.
    lastCount, lastChange = -1, time.monotonic()
    deliveredAt = time.perf_counter()
    while True:
        _, unique, _, _ = sinkState(countFile)
        if unique != lastCount:
            lastCount, lastChange = unique, time.monotonic()
            deliveredAt = time.perf_counter()
        if unique >= load["accepted"] or time.monotonic() - lastChange > 30:
            break
        time.sleep(0.01)
    cpu1, system1 = cpuSeconds(target.roots)
    cpu, system = cpu1 - cpu0, system1 - system0
    busy, irq = machineSeconds()
    busy, irq = busy - busy0, irq - irq0
    peakPss = max(sampler.stop(), pssOf(processTree(target.roots)))
    after = memory(target.roots)
    messages, unique, connections, sinkCpu = sinkState(countFile)
    accepted = max(1, load["accepted"])
    concurrency = max(1, scenario.sessions)
    return {
        **load,
        "delivered": unique,
        "lost": max(0, load["accepted"] - unique),
        "duplicates": messages - unique,
        "upstream_connections": connections,
        "delivered_per_second": round(unique / (deliveredAt - started), 1),
        "cpu_seconds": round(cpu, 2),
        "cpu_seconds_per_1000": round(cpu * 1000 / accepted, 3),
        # Of which in the kernel (stime): syscalls, fsync, TCP sends.
        "system_cpu_seconds": round(system, 2),
        # The whole machine's process CPU in the window, less the relay,
        # the load generator and the sink: the other tenants of the machine
        # and kernel threads (the file system journal's among them).
        "other_cpu_seconds": round(
            busy - cpu - load.get("loadgen_cpu_s", 0) - (sinkCpu - sinkCpu0), 2
        ),
        "irq_cpu_seconds": round(irq, 2),
        "rss_before_mb": round(before["rss"] / 2**20, 1),
        "peak_rss_mb": round(after["hwm"] / 2**20, 1),
        "peak_pss_mb": round(peakPss / 2**20, 1),
        # Memory growth per concurrent session over the idle relay: summed
        # PSS (sampled) for both; for a single process also VmHWM - VmRSS,
        # exact (a sum of per-process peaks is not a peak of the sum).
        "pss_before_mb": round(before["pss"] / 2**20, 1),
        "peak_pss_growth_per_session_mb": round(
            max(0, peakPss - before["pss"]) / 2**20 / concurrency, 2
        ),
        "peak_rss_growth_per_session_mb": round(
            max(0, after["hwm"] - before["rss"]) / 2**20 / concurrency, 2
        )
        if before["processes"] == 1
        else None,
        "processes_after": after["processes"],
    }


def handshakes(port: int, count: int, concurrency: int, resume: bool) -> int:
    """
    C{count} connections to the implicit-TLS C{port}, C{concurrency} at a
    time: handshake, greeting, QUIT.  With C{resume}, each client thread
    offers the session (ticket) of its previous connection.

    @return: how many handshakes resumed a session.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def client(n: int) -> int:
        session, resumed = None, 0
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with context.wrap_socket(
                    raw, server_hostname="localhost", session=session
                ) as s:
                    s.recv(1024)  # the greeting (and TLS 1.3's tickets)
                    s.sendall(b"QUIT\r\n")
                    s.recv(1024)
                    resumed += s.session_reused
                    if resume:
                        session = s.session
        return resumed

    share = [count // concurrency] * concurrency
    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(client, share))


def measureHandshakes(target: Target, scenario: Scenario) -> dict[str, Any]:
    """
    Handshakes per second and the relay's CPU per handshake, first with a
    new session each time, then resuming.
    """
    result: dict[str, Any] = {}
    for mode in ("new", "resumed"):
        cpu0, _ = cpuSeconds(target.roots)
        started = time.perf_counter()
        resumed = handshakes(
            target.tlsPort, scenario.handshakes, scenario.sessions, mode == "resumed"
        )
        seconds = time.perf_counter() - started
        cpu = cpuSeconds(target.roots)[0] - cpu0
        result[f"handshakes_{mode}_per_second"] = round(
            scenario.handshakes / seconds, 1
        )
        result[f"cpu_ms_per_handshake_{mode}"] = round(
            cpu * 1000 / scenario.handshakes, 2
        )
        result[f"sessions_resumed_{mode}"] = resumed
    return result


def measureIdle(target: Target, scenario: Scenario) -> dict[str, Any]:
    base = memory(target.roots)
    gen = subprocess.Popen(
        loadgenCommand(target, "--idle", str(scenario.idle), "--idle-steps", "2"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert gen.stdout is not None and gen.stdin is not None
    points = []
    started = time.perf_counter()
    for _ in range(2):
        ready = gen.stdout.readline().split()
        held = int(ready[-1]) if ready else 0
        time.sleep(3.0)
        points.append((held, memory(target.roots)))
        gen.stdin.write("next\n")
        gen.stdin.flush()
    elapsed = time.perf_counter() - started
    gen.stdin.close()
    out = gen.stdout.read()
    gen.wait(120)
    final = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    (held1, mem1), (held2, mem2) = points
    perSession = (mem2["pss"] - mem1["pss"]) / max(1, held2 - held1)
    return {
        "idle_sessions": held2,
        "failed": final.get("failed"),
        "auth_454": final.get("auth_454"),
        "first_failures": final.get("first_failures"),
        "seconds_to_open": round(elapsed - 6.0, 1),
        "pss_before_mb": round(base["pss"] / 2**20, 1),
        "pss_half_mb": round(mem1["pss"] / 2**20, 1),
        "pss_after_mb": round(mem2["pss"] / 2**20, 1),
        "rss_after_mb": round(mem2["rss"] / 2**20, 1),
        # The slope between half and all the sessions: one-off costs (the
        # first TLS handshake, lazy imports, ...) are not in it.
        "kb_per_session": round(perSession / 1024, 1),
        "kb_per_session_overall": round(
            (mem2["pss"] - base["pss"]) / 1024 / max(1, held2), 1
        ),
        "processes": mem2["processes"],
    }


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [
            r[key]
            for r in runs
            if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
        ]
        out[key] = statistics.median(values) if values else runs[0][key]
    out["runs"] = runs
    return out


ROWS = (
    ("accepted_per_second", "accepted/s", True),
    ("delivered_per_second", "delivered/s", True),
    ("latency_p50_ms", "p50 accept latency, ms", False),
    ("latency_p99_ms", "p99 accept latency, ms", False),
    ("mail_latency_p50_ms", "p50 MAIL FROM latency, ms", False),
    ("mail_latency_p99_ms", "p99 MAIL FROM latency, ms", False),
    ("cpu_seconds_per_1000", "CPU s per 1,000 messages", False),
    ("peak_pss_mb", "peak memory (summed PSS, sampled), MB", False),
    (
        "peak_pss_growth_per_session_mb",
        "peak PSS growth per concurrent session, MB",
        False,
    ),
    (
        "peak_rss_growth_per_session_mb",
        "peak RSS growth per concurrent session (VmHWM), MB",
        False,
    ),
    ("kb_per_session", "KB per idle session (PSS slope)", False),
    ("kb_per_session_overall", "KB per idle session (overall)", False),
    ("rss_after_mb", "RSS with all idle sessions, MB", False),
    ("handshakes_new_per_second", "handshakes/s, new session", True),
    ("handshakes_resumed_per_second", "handshakes/s, resumed session", True),
    ("cpu_ms_per_handshake_new", "relay CPU ms per handshake, new session", False),
    (
        "cpu_ms_per_handshake_resumed",
        "relay CPU ms per handshake, resumed session",
        False,
    ),
    ("sessions_resumed_resumed", "sessions resumed (of those offered)", True),
    ("lost", "lost messages", False),
    ("errors", "load generator errors", False),
    ("auth_454", "AUTH answered 454 (retried)", False),
)


#: Column headings of the targets in L{table}.
LABELS = {
    "relay": "ours",
    "relay1": "ours, 1 process",
    "base": "ours at --base",
    "postfix": "Postfix",
}


def table(results: dict[str, dict[str, Any]]) -> str:
    """
    One row per scenario and measure: each target measured, then the first
    target's value over each other's.
    """
    names: list[str] = []
    for byTarget in results.values():
        names += [n for n in byTarget if n not in names]
    if not names:
        return ""
    first, others = names[0], names[1:]
    heads = [LABELS.get(n, n) for n in names]
    heads += [f"{LABELS.get(first, first)} / {LABELS.get(n, n)}" for n in others]
    rows = ["| scenario | measure | " + " | ".join(heads) + " |"]
    rows.append("|---" * (2 + len(heads)) + "|")
    for scenarioName, byTarget in results.items():
        for key, label, _ in ROWS:
            values = [byTarget.get(n, {}).get(key) for n in names]
            if all(v is None for v in values):
                continue
            cells = ["-" if v is None else str(v) for v in values]
            a = values[0]
            for b in values[1:]:
                ok = isinstance(a, (int, float)) and isinstance(b, (int, float))
                cells.append(f"{a / b:.2f}" if ok and b else "-")
            rows.append(
                f"| {SCENARIOS[scenarioName].description} | {label} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="relay,postfix")
    p.add_argument("--scenarios", default="s8,s64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--idle", type=int, default=1000, help="sessions in the idle scenario"
    )
    p.add_argument(
        "--source",
        default=None,
        help="run ours from this directory instead of a snapshot of the checkout",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="COMMIT",
        help="the base target runs ours as of this commit (exported with git"
        " archive), to measure a change against what it changes in one run",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    p.add_argument(
        "--table", metavar="RESULTS", help="only print the table of a results file"
    )
    p.add_argument("--name", default=time.strftime("%Y-%m-%d-%H%M"))
    args = p.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)["results"]))
        return 0
    # SIGTERM unwinds like Ctrl-C, so the relays and sinks are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    snapshot = None
    source: dict[str, Any]
    if args.source is None:
        snapshot, source = snapshotSource(ROOT)
        args.source = snapshot
    else:
        source = {"source": args.source}
    base: dict[str, Any] | None = None
    if args.base is not None:
        args.base, base = exportCommit(ROOT, args.base)
    targets = [TARGETS[t] for t in args.targets.split(",")]
    results: dict[str, dict[str, Any]] = {}
    loads = [os.getloadavg()]
    used: dict[str, Scenario] = {}
    try:
        for scenarioName in args.scenarios.split(","):
            scenario = SCENARIOS[scenarioName]
            if scenario.idle:
                scenario = replace(scenario, idle=args.idle)
            used[scenarioName] = scenario
            runs: dict[str, list[dict[str, Any]]] = {
                t.__name__.lower(): [] for t in targets
            }
            for i in range(args.repeat):
                order = targets if i % 2 == 0 else targets[::-1]
                for t in order:
                    r = measure(t, scenario, args)
                    r["loadavg"] = [round(x, 2) for x in os.getloadavg()]
                    runs[t.__name__.lower()].append(r)
                    print(
                        f"{scenarioName} #{i + 1} {t.__name__}: {json.dumps(r)}",
                        flush=True,
                    )
            results[scenarioName] = {name: median(rs) for name, rs in runs.items()}
            loads.append(os.getloadavg())
    finally:
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
        if base is not None:
            shutil.rmtree(args.base, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"{args.name}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": os.uname().nodename,
                "cores": os.cpu_count(),
                "loadavg_between_scenarios": [
                    [round(x, 2) for x in la] for la in loads
                ],
                "code": source,
                "base": base,
                "repeat": args.repeat,
                "scenarios": {n: sc.__dict__ for n, sc in used.items()},
                "results": results,
            },
            f,
            indent=1,
        )
    print(table(results))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
