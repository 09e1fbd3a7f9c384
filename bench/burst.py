"""
Burst benchmark: N messages accepted while the smarthost is down, then
delivered when it comes back.

Starts the real relay (twistd plugin, smarthost mode, STARTTLS + AUTH on the
submission side) and an aiosmtpd sink on loopback, and reports:

  - accepted/s and accept latency (end of DATA to 250) over C sessions;
  - seconds from the sink's start until every message arrived, and how many
    upstream connections that took (connection reuse);
  - the relay's CPU seconds per 1,000 messages and its peak RSS;
  - lost and duplicated messages (must be 0 lost).

Usage: python bench/burst.py [--messages 1000] [--sessions 16]
Run from the repository root with the project installed (./run tests once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from aiosmtpd.controller import Controller  # noqa: E402

from smtpauth_relay.demo import twistdCommand  # noqa: E402
from smtpauth_relay.htpasswd import setUser  # noqa: E402
from smtpauth_relay.passwords import hashPassword  # noqa: E402
from smtpauth_relay.tls import generateSelfSigned  # noqa: E402


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """
    Counts what arrives, and the connections it came over.
    """

    def __init__(self) -> None:
        self.messageIds: list[str] = []
        self.connections = 0
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        with self.lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        for line in envelope.content.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                with self.lock:
                    self.messageIds.append(line.split(b":", 1)[1].strip().decode())
                break
        return "250 2.0.0 Ok"


def procStats(pid: int) -> tuple[float, int]:
    """
    CPU seconds (user + system) and peak RSS in bytes of process C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048, help="body bytes")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="smtpauth-bench-")
    generateSelfSigned(f"{work}/cert.pem", f"{work}/key.pem", "localhost")
    setUser(f"{work}/users", "bench", hashPassword(b"secret", rounds=10))
    submission, sinkPort = freePort(), freePort()
    with open(f"{work}/relay.toml", "w") as f:
        f.write(
            f"""
[server]
hostname = "relay.bench"
max_connections_per_ip = 1000
[tls]
certificate = "cert.pem"
private_key = "key.pem"
[[listener]]
endpoint = "tcp:port={submission}:interface=127.0.0.1"
tls = "starttls"
[auth]
checkers = ["htpasswd:{work}/users"]
[queue]
directory = "spool"
retry_schedule = [1]
max_concurrent_deliveries = 50
[delivery]
mode = "smarthost"
host = "127.0.0.1"
port = {sinkPort}
tls = "none"
max_per_destination = 4
"""
        )
    env = dict(
        os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    log = open(f"{work}/relay.log", "wb")
    relay = subprocess.Popen(
        twistdCommand(
            ["-n", "--pidfile=", "smtpauth-relay", "--config", f"{work}/relay.toml"]
        ),
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", submission), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("relay did not start; see " + log.name) from None
                time.sleep(0.1)
        cpuStart, _ = procStats(relay.pid)

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        body = "x" * 76 + "\n"
        text = body * max(1, args.size // len(body))
        perSession = [args.messages // args.sessions] * args.sessions
        for i in range(args.messages % args.sessions):
            perSession[i] += 1
        latencies: list[float] = []
        sent: list[str] = []
        lock = threading.Lock()

        def session(index: int) -> None:
            with smtplib.SMTP("127.0.0.1", submission, timeout=60) as client:
                client.starttls(context=context)
                client.login("bench", "secret")
                for n in range(perSession[index]):
                    message = EmailMessage()
                    messageId = f"<bench-{index}-{n}@bench>"
                    message["From"] = "bench@example.org"
                    message["To"] = "sink@example.net"
                    message["Subject"] = "burst"
                    message["Message-ID"] = messageId
                    message.set_content(text)
                    started = time.monotonic()
                    client.send_message(message)
                    with lock:
                        latencies.append(time.monotonic() - started)
                        sent.append(messageId)

        started = time.monotonic()
        with ThreadPoolExecutor(args.sessions) as pool:
            list(pool.map(session, range(args.sessions)))
        acceptSeconds = time.monotonic() - started
        cpuAccepted, _ = procStats(relay.pid)

        sink = Sink()
        controller = Controller(sink, hostname="127.0.0.1", port=sinkPort)
        controller.start()
        sinkStarted = time.monotonic()
        try:
            deadline = time.monotonic() + 600
            while len(set(sink.messageIds)) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.05)
            deliverSeconds = time.monotonic() - sinkStarted
            time.sleep(1)
        finally:
            controller.stop()
        cpuEnd, peak = procStats(relay.pid)
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)

    latencies.sort()
    received = set(sink.messageIds)
    results = {
        "messages": len(sent),
        "sessions": args.sessions,
        "body_bytes": len(text),
        "accepted_per_second": round(len(sent) / acceptSeconds, 1),
        "accept_latency_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "accept_latency_p99_ms": round(
            latencies[int(len(latencies) * 0.99) - 1] * 1000, 1
        ),
        "delivery_seconds_after_upstream_up": round(deliverSeconds, 2),
        "delivered_per_second": round(len(received) / deliverSeconds, 1),
        "upstream_connections": sink.connections,
        "lost": len(set(sent) - received),
        "duplicates": len(sink.messageIds) - len(received),
        "relay_cpu_seconds_per_1000_accepted": round(
            (cpuAccepted - cpuStart) * 1000 / len(sent), 2
        ),
        "relay_cpu_seconds_per_1000_delivered": round(
            (cpuEnd - cpuAccepted) * 1000 / max(1, len(received)), 2
        ),
        "relay_peak_rss_mb": round(peak / 2**20, 1),
    }
    for key, value in results.items():
        print(f"{key:40} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
