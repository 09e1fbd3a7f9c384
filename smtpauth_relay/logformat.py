"""
The relay's log observers.

C{[logging] format = "json"}: one JSON object per log event, one per line,
for journald, Loki, Elasticsearch and the like.

C{format = "text"} is twistd's own line format.  When twistd writes it to
standard output (C{-n}, no C{--logfile}, C{--syslog} or C{--logger}: how
systemd runs the relay), L{textObserver} writes the same lines but formats
each second's timestamp once, not once per line (time-zone work that was
6 % of the relay's Python time under load), and the message with
C{str.format_map} where that gives Twisted's text (L{classicLogText}).
Any other twistd logging choice is left to twistd.

Each object has C{time} (ISO 8601, UTC), C{level}, C{namespace} (the module
that logged), C{message} (the same text the human-readable log shows) and
every named field of the event whose value is plain data (C{user},
C{peer}, C{mechanism}, C{queueId}, ...).  Fields whose names suggest a
secret are never written, whatever a caller passed.  A logged failure adds
C{error} and C{traceback}.

twistd installs the log observer after the service is made but before it
starts; L{LogObserverRoot} hands ours to twistd as the application's
C{ILogObserver} component, the way a C{.tac} file would.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer, provider

#: Field names never written: a secret must not reach a log, even by mistake.
SECRET_FIELD = re.compile(r"pass|secret|token|credential|private", re.IGNORECASE)

_PLAIN = (str, int, float, bool, type(None))


def eventAsDict(event: LogEvent) -> dict[str, Any]:
    """
    The JSON-ready form of one log event.

    @param event: a L{twisted.logger} event.
    @return: a flat dict of plain values (see the module docstring).
    """
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
            if isinstance(when, (int, float))
            else None
        ),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for name, value in event.items():
        if name.startswith("log_") or name in record or SECRET_FIELD.search(name):
            continue
        if isinstance(value, _PLAIN):
            record[name] = value
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, _PLAIN) for v in value
        ):
            record[name] = list(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        kind = failure.type.__name__ if failure.type is not None else "Error"
        record["error"] = f"{kind}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Write each event as one line of JSON to a text file.
    """

    def __init__(self, outFile: IO[str]) -> None:
        """
        @param outFile: where lines go; taken at construction, before twistd
            redirects C{sys.stdout} into the log.
        """
        self._outFile = outFile

    def __call__(self, event: LogEvent) -> None:
        line = json.dumps(eventAsDict(event), ensure_ascii=False, default=repr)
        self._outFile.write(line + "\n")
        self._outFile.flush()


def cachedFormatTime() -> Any:
    """
    A C{formatTime(when)} giving what L{twisted.logger.formatTime} gives
    with its default (RFC 3339, whole seconds) format, computed once per
    second.
    """
    last: list[Any] = [None, ""]

    def timeOf(when: float | None) -> str:
        if when is None or when < 0:
            return formatTime(when)
        second = int(when)
        if when - second >= 0.999999:
            # datetime rounds to microseconds: this may be the next second.
            return formatTime(when)
        if last[0] != second:
            last[0], last[1] = second, formatTime(second)
        return str(last[1])

    return timeOf


def classicLogText(formatTime: Callable[[float | None], str]) -> Any:
    """
    L{formatEventAsClassicLogText}, the same lines for the same events,
    faster for the common ones.

    Twisted formats C{log_format} with L{string.Formatter} (Python code, so
    that a field may say C{{f()}} to call C{f}): under load that was about
    half of the relay's logging time.  An event with a text format and no
    failure is formatted here with C{str.format_map}, which gives the same
    text whenever it succeeds; anything else (a failure's traceback, a
    flattened event, a call in the format, a missing key) is left to
    Twisted, which writes what it always does.
    """

    def fallback(event: LogEvent) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=formatTime)

    def text(event: LogEvent) -> str | None:
        format = event.get("log_format")
        if (
            type(format) is not str
            or "log_failure" in event
            or "log_flattened" in event
            # Twisted wraps each value: {x.__class__} and {x._wrapped} name
            # the wrapper's attributes there.
            or "._" in format
        ):
            return fallback(event)
        try:
            message = format.format_map(event)
        except Exception:
            return fallback(event)
        if not message:
            return None
        system = event.get("log_system")
        if system is None:
            system = defaultSystem(event)
        elif type(system) is not str:
            return fallback(event)
        line = f"{formatTime(event.get('log_time'))} [{system}] {message}"
        return line.replace("\n", "\n\t") + "\n"

    return text


def textObserver(outFile: IO[str]) -> FileLogObserver:
    """
    twistd's text lines (C{textFileLogObserver}) with L{cachedFormatTime}
    and L{classicLogText}.

    @param outFile: taken at construction, before twistd redirects
        C{sys.stdout} into the log.
    """
    return FileLogObserver(outFile, classicLogText(cachedFormatTime()))


def twistdLogsToStdout(twistdOptions: Any) -> bool:
    """
    Whether twistd, run with C{twistdOptions} (its own options, the parent
    of ours), would write its text log to standard output.
    """
    if twistdOptions is None:
        return False
    get = twistdOptions.get
    return bool(
        get("nodaemon")
        and not get("syslog")
        and get("logger") is None
        and get("logfile") in (None, "", "-")
    )


class LogObserverRoot(MultiService):
    """
    The top service: when twistd adds it to its application, it sets the
    application's log observer (if one was chosen).
    """

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def observerFor(
    format: str, outFile: IO[str] | None = None, twistdOptions: Any = None
) -> ILogObserver | None:
    """
    The log observer for C{[logging] format}, or C{None} for twistd's own.

    @param outFile: where lines go; C{sys.stdout} now if C{None}.
    @param twistdOptions: twistd's options, to tell whether its text log
        would go to standard output (see L{twistdLogsToStdout}).
    """
    out = outFile if outFile is not None else sys.stdout
    if format == "json":
        return JSONLinesObserver(out)
    if twistdLogsToStdout(twistdOptions):
        return textObserver(out)
    return None


def defaultSystem(event: LogEvent) -> str:
    """
    The bracket of a text line whose event has no C{log_system}, as
    Twisted writes it: C{namespace#level} (C{-} for either missing).
    """
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"


def workerObserver(observer: ILogObserver, index: int) -> ILogObserver:
    """
    C{observer}, for a worker process (C{[server] workers}): each event
    says which worker logged it, as a C{worker} field (JSON) and in the
    text line's bracket (C{[smtpauth_relay.server#info worker=1]}).
    """

    @provider(ILogObserver)
    def tag(event: LogEvent) -> None:
        event = dict(event)
        event.setdefault("worker", index)
        if "log_system" not in event:
            event["log_system"] = f"{defaultSystem(event)} worker={index}"
        observer(event)

    return tag
