"""
SMTP submission load generator (asyncio, stdlib only).

Each of C{--sessions} concurrent slots runs SMTP sessions one after the
other: connect, EHLO, STARTTLS (or implicit TLS, or none), EHLO, AUTH PLAIN,
C{--per-session} messages of C{--size} bytes, QUIT; until C{--messages}
messages in all have been accepted.  Accept latency is the time from the
end-of-data dot (once the message has been handed to the kernel) to the 250.

The run gives up, rather than retrying for ever, after C{--max-errors}
failures (refused connections, 4xx/5xx replies, resets) or C{--timeout}
seconds; the JSON then says so ("aborted").  A relay that throttles the
benchmark (rate limits, lockout) is a misconfigured benchmark, not a slow
relay.

With C{--idle N} it instead opens N sessions, authenticates them and holds
them open.  With C{--idle-steps K} it opens them in K equal steps, printing
"IDLE READY n" after each step and waiting for a line on stdin before the
next; after the last step it waits for one more line (or SIGTERM), closes
everything and prints the JSON.

Prints one JSON object of results on stdout (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import signal
import ssl
import sys
import time


class SMTPError(Exception):
    pass


class AuthBusy(SMTPError):
    """
    AUTH answered 454 (temporary failure: the relay's password checks are
    saturated); a client tries again.
    """


class Session:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    async def command(self, line: bytes, expect: int) -> list[bytes]:
        self.writer.write(line + b"\r\n")
        code, lines = await self.reply()
        if code != expect:
            raise SMTPError(f"{line[:20]!r}: {b''.join(lines)!r}")
        return lines


def tlsContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def openSession(args: argparse.Namespace, context: ssl.SSLContext) -> Session:
    if args.tls == "implicit":
        reader, writer = await asyncio.open_connection(
            args.host, args.port, ssl=context, server_hostname="localhost"
        )
    else:
        reader, writer = await asyncio.open_connection(args.host, args.port)
    session = Session(reader, writer)
    try:
        code, lines = await session.reply()
        if code != 220:
            raise SMTPError(f"greeting {lines!r}")
        await session.command(b"EHLO loadgen.bench", 250)
        if args.tls == "starttls":
            await session.command(b"STARTTLS", 220)
            await writer.start_tls(context, server_hostname="localhost")
            await session.command(b"EHLO loadgen.bench", 250)
        if args.user:
            token = base64.b64encode(f"\0{args.user}\0{args.password}".encode())
            writer.write(b"AUTH PLAIN " + token + b"\r\n")
            code, lines = await session.reply()
            if code == 454:
                raise AuthBusy(b"".join(lines).decode(errors="replace"))
            if code != 235:
                raise SMTPError(f"AUTH: {b''.join(lines)!r}")
    except BaseException:
        writer.close()
        raise
    return session


class Aborted(Exception):
    pass


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.remaining = args.messages
        self.nextIndex = 0
        self.latencies: list[float] = []
        # MAIL FROM sent -> its 250: where a relay's in-flow control (ours,
        # Postfix's in_flow_delay) makes a client wait.
        self.mailLatencies: list[float] = []
        self.errors: list[str] = []
        self.errorCount = 0
        self.authBusy = 0
        self.aborted: str | None = None
        self.sessions = 0
        self.context = tlsContext()
        # The body is built once, the index only in the headers.
        line = b"x" * 76 + b"\r\n"
        self.filler = line * max(0, (args.size - 200) // len(line))

    def message(self, index: int) -> bytes:
        return (
            f"From: <{index}@loadgen.bench>\r\nTo: <sink@sink.bench>\r\n"
            f"Subject: bench {index}\r\nMessage-ID: <bench-{index}@loadgen.bench>"
            "\r\n\r\n"
        ).encode() + self.filler

    def error(self, text: str) -> None:
        self.errorCount += 1
        if len(self.errors) < 10:
            self.errors.append(text)
        if self.errorCount >= self.args.max_errors and self.aborted is None:
            self.aborted = f"{self.errorCount} errors"
        if self.aborted is not None:
            raise Aborted(self.aborted)

    async def slot(self) -> None:
        args = self.args
        while self.remaining > 0 and self.aborted is None:
            try:
                session = await openSession(args, self.context)
            except AuthBusy:
                self.authBusy += 1
                await asyncio.sleep(0.01)
                continue
            except (OSError, SMTPError) as e:
                self.error(f"connect: {e}")
                await asyncio.sleep(0.05)
                continue
            self.sessions += 1
            try:
                for _ in range(args.per_session):
                    if self.remaining <= 0 or self.aborted is not None:
                        break
                    self.remaining -= 1
                    self.nextIndex += 1
                    try:
                        await self.send(session, self.nextIndex)
                    except SMTPError as e:
                        self.remaining += 1
                        self.error(str(e))
                        break
                session.writer.write(b"QUIT\r\n")
                await session.writer.drain()
            except (OSError, SMTPError) as e:
                self.error(str(e))
            finally:
                session.writer.close()

    async def send(self, session: Session, index: int) -> None:
        w = session.writer
        mailSent = time.perf_counter()
        if self.args.pipelining:
            w.write(
                b"MAIL FROM:<bench@loadgen.bench>\r\n"
                b"RCPT TO:<sink@sink.bench>\r\nDATA\r\n"
            )
            for step, expect in enumerate((250, 250, 354)):
                code, lines = await session.reply()
                if code != expect:
                    raise SMTPError(b"".join(lines).decode(errors="replace"))
                if step == 0:
                    self.mailLatencies.append(time.perf_counter() - mailSent)
        else:
            await session.command(b"MAIL FROM:<bench@loadgen.bench>", 250)
            self.mailLatencies.append(time.perf_counter() - mailSent)
            await session.command(b"RCPT TO:<sink@sink.bench>", 250)
            await session.command(b"DATA", 354)
        w.write(self.message(index))
        # For large messages: wait until most of the body is with the
        # kernel, so the latency is not the client's own transfer time.
        await w.drain()
        w.write(b".\r\n")
        started = time.perf_counter()
        code, lines = await session.reply()
        if code != 250:
            raise SMTPError(b"".join(lines).decode(errors="replace"))
        self.latencies.append(time.perf_counter() - started)

    async def main(self) -> dict[str, object]:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(self.slot()) for _ in range(self.args.sessions)]
        done, pending = await asyncio.wait(tasks, timeout=self.args.timeout)
        if pending:
            self.aborted = self.aborted or f"timeout after {self.args.timeout}s"
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(exc, Aborted):
                self.aborted = self.aborted or repr(exc)
        elapsed = time.perf_counter() - started
        lat = sorted(self.latencies)
        mailLat = sorted(self.mailLatencies)

        def pct(p: float, values: list[float] = lat) -> float | None:
            if not values:
                return None
            return round(values[min(len(values) - 1, int(len(values) * p))] * 1000, 1)

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "accepted": len(lat),
            "seconds": round(elapsed, 3),
            "accepted_per_second": round(len(lat) / elapsed, 1) if elapsed else 0,
            "latency_p50_ms": pct(0.50),
            "latency_p99_ms": pct(0.99),
            "latency_max_ms": pct(1.0),
            "mail_latency_p50_ms": pct(0.50, mailLat),
            "mail_latency_p99_ms": pct(0.99, mailLat),
            "sessions_opened": self.sessions,
            "errors": self.errorCount,
            "auth_454": self.authBusy,
            "first_errors": self.errors[:5],
            "aborted": self.aborted,
            "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        }


async def idle(args: argparse.Namespace) -> dict[str, object]:
    context = tlsContext()
    sessions: list[Session] = []
    failures: list[str] = []
    busy = 0
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def readLine() -> None:
        line = sys.stdin.readline()
        lines.put_nowait(line)
        if not line:
            loop.remove_reader(sys.stdin.fileno())

    loop.add_reader(sys.stdin.fileno(), readLine)
    loop.add_signal_handler(signal.SIGTERM, lines.put_nowait, "")
    steps = max(1, args.idle_steps)
    for step in range(steps):
        goal = args.idle * (step + 1) // steps
        while len(sessions) + len(failures) < goal and len(failures) < args.max_errors:
            results = await asyncio.gather(
                *(
                    openSession(args, context)
                    for _ in range(
                        min(args.idle_batch, goal - len(sessions) - len(failures))
                    )
                ),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, Session):
                    sessions.append(r)
                elif isinstance(r, AuthBusy):
                    busy += 1
                else:
                    failures.append(repr(r))
        print(f"IDLE READY {len(sessions)}", flush=True)
        if not await lines.get():
            break
    else:
        await lines.get()
    for s in sessions:
        s.writer.close()
    return {
        "idle_sessions": len(sessions),
        "failed": len(failures),
        "auth_454": busy,
        "first_failures": failures[:5],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--tls", choices=("starttls", "implicit", "none"), default="starttls"
    )
    p.add_argument("--user", default="bench")
    p.add_argument("--password", default="secret")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--per-session", type=int, default=10)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--pipelining", action="store_true")
    p.add_argument("--max-errors", type=int, default=50)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--idle", type=int, default=0, help="hold N idle sessions")
    p.add_argument("--idle-steps", type=int, default=1)
    p.add_argument("--idle-batch", type=int, default=30, help="sessions opened at once")
    args = p.parse_args()
    if args.idle:
        result = asyncio.run(idle(args))
    else:
        result = asyncio.run(Run(args).main())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
