"""
A fast counting SMTP sink (asyncio, stdlib only): accepts every message,
answers 250 at once, and every 20 ms writes to C{--count-file} one line:

    MESSAGES UNIQUE CONNECTIONS CPU_SECONDS

(messages received, distinct C{Message-ID}s among them, connections
accepted, the sink's own CPU time).  MESSAGES - UNIQUE are duplicates; a
benchmark compares UNIQUE with what its load generator had accepted to find
lost messages.  Pipelining and RSET are supported so a relay can reuse its
connections.

Usage: python bench/sink.py --port 2525 --count-file /tmp/count
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import time

EHLO = (
    b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
MESSAGE_ID = re.compile(rb"(?im)^Message-ID:[ \t]*(<[^>\r\n]*>)")


class Sink:
    def __init__(self) -> None:
        self.messages = 0
        self.connections = 0
        self.ids: set[bytes] = set()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        writer.write(b"220 sink.bench ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(EHLO if verb == b"EHLO" else b"250 sink.bench\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    # The header is at the start (after the relays' trace
                    # headers); do not scan a 5 MB body.
                    match = MESSAGE_ID.search(data, 0, 16384)
                    self.ids.add(match.group(1) if match else b"%d" % self.messages)
                    self.messages += 1
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                if not reader._buffer:  # type: ignore[attr-defined]
                    await writer.drain()
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()


async def main(args: argparse.Namespace) -> None:
    sink = Sink()
    server = await asyncio.start_server(
        sink.handle, args.host, args.port, limit=2**26, backlog=1024
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    last = None
    async with server:
        while True:
            state = (sink.messages, sink.connections)
            if state != last or stop.is_set():
                last = state
                tmp = args.count_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(
                        f"{sink.messages} {len(sink.ids)} {sink.connections} "
                        f"{time.process_time():.2f}\n"
                    )
                os.replace(tmp, args.count_file)
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(stop.wait(), 0.02)
            except TimeoutError:
                pass


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count-file", required=True)
    asyncio.run(main(p.parse_args()))
