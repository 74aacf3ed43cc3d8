"""Logging set-up: one JSON object per line for log collectors, or plain text for people."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from stream_worker.config import LoggingConfig

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Fields passed with ``extra=`` (reason, topic, offset ...) become JSON keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RepeatSummarizingHandler(logging.StreamHandler):
    """Writes one line per run of a repeated Kafka-client warning instead of hundreds a second.

    During a broker failover kafka-python logs the same warning (``Marking the coordinator dead
    ...``, varying only in node and error) up to ~400 times a second. A warning or error from a
    ``kafka.*`` logger whose template (logger, level, unformatted message) was written less than
    ``seconds`` ago is counted, not written. The count comes out as a line of its own ("repeated N
    more times in S s", JSON key ``repeated``) as soon as anything else is logged after the window,
    or its logger says something different (the next state), or the process exits; the worker's
    own messages are never held back. ``seconds`` 0 writes every line.
    """

    def __init__(self, stream, seconds: float) -> None:
        super().__init__(stream)
        self.seconds = seconds
        self._runs: dict[tuple[str, int, str], list] = {}  # template -> [first record, last written, held]
        self._runs_lock = threading.Lock()

    def handle(self, record: logging.LogRecord) -> bool:
        if self.seconds <= 0 or not self.filter(record):
            return super().handle(record)
        key = (record.name, record.levelno, str(record.msg))
        watched = (record.name == "kafka" or record.name.startswith("kafka.")) and record.levelno >= logging.WARNING
        with self._runs_lock:
            run = self._runs.get(key) if watched else None
            if run is not None and record.created - run[1] < self.seconds:
                run[2] += 1
                return True
            due = self._take_due(record)
            if watched:
                self._runs[key] = [record, record.created, 0]
        for summary in due:
            super().handle(summary)
        return super().handle(record)

    def _take_due(self, record: logging.LogRecord) -> list[logging.LogRecord]:
        """Summaries of the held runs that ``record`` ends (its logger moved on to another message,
        or the run's window is over), their counts reset."""
        due = []
        for (name, _, template), run in self._runs.items():
            first, written, held = run
            moved_on = name == record.name and template != str(record.msg)
            if held and (moved_on or record.created - written >= self.seconds):
                due.append(self._summary(first, held, record.created - written))
                run[2] = 0
        return due

    @staticmethod
    def _summary(first: logging.LogRecord, held: int, seconds: float) -> logging.LogRecord:
        return logging.makeLogRecord({
            "name": first.name, "levelno": first.levelno, "levelname": first.levelname,
            "msg": "%s (repeated %d more %s in %.1f s)",
            "args": (first.getMessage(), held, "time" if held == 1 else "times", seconds),
            "repeated": held,
        })

    def close(self) -> None:
        """Writes what is still held (logging.shutdown closes handlers at exit)."""
        with self._runs_lock:
            now = time.time()
            due = [self._summary(first, held, now - written) for first, written, held in self._runs.values() if held]
            self._runs.clear()
        for summary in due:
            super().handle(summary)
        super().close()


def setup_logging(config: LoggingConfig) -> None:
    handler = RepeatSummarizingHandler(sys.stderr, config.repeat_summary_seconds)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # kafka-python narrates every connection at INFO; its warnings and errors are what operators need.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
