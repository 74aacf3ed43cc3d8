"""Log lines: repeated Kafka-client warnings are summarised, nothing else is held back."""

import io
import json
import logging

import pytest

from stream_worker.config import LoggingConfig
from stream_worker.logs import JsonFormatter, RepeatSummarizingHandler, setup_logging

COORDINATOR_DEAD = "Marking the coordinator dead (node %s) for group %s: %s."


def record(name: str, msg: str, args: tuple = (), created: float = 1000.0, level: int = logging.WARNING):
    entry = logging.makeLogRecord({"name": name, "msg": msg, "args": args, "levelno": level,
                                   "levelname": logging.getLevelName(level)})
    entry.created = created
    return entry


@pytest.fixture
def written():
    stream = io.StringIO()
    handler = RepeatSummarizingHandler(stream, seconds=30)
    handler.setFormatter(JsonFormatter())

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    return handler, lines


def test_a_flood_of_one_warning_is_its_first_line_then_one_count_when_the_client_moves_on(written):
    handler, lines = written
    for i in range(400):  # one second of a failover: nodes and errors vary, the template does not
        handler.handle(record("kafka.coordinator", COORDINATOR_DEAD, (f"coordinator-{i % 3}", "g", "Node Disconnected"),
                              created=1000 + i / 400))
    assert [line["message"] for line in lines()] == [
        "Marking the coordinator dead (node coordinator-0) for group g: Node Disconnected."]
    handler.handle(record("kafka.coordinator", "Heartbeat failed for group %s because it is rebalancing", ("g",),
                          created=1001.5))
    summary, state_change = lines()[1:]
    assert summary["repeated"] == 399 and "repeated 399 more times in 1.5 s" in summary["message"]
    assert summary["level"] == "WARNING" and summary["logger"] == "kafka.coordinator"
    assert state_change["message"] == "Heartbeat failed for group g because it is rebalancing"


def test_the_same_warning_after_its_window_is_written_again_after_its_count(written):
    handler, lines = written
    for created in (1000, 1001, 1002, 1031):
        handler.handle(record("kafka.client", "Node %s connection failed", ("1",), created=created))
    assert [line.get("repeated") for line in lines()] == [None, 2, None]
    assert lines()[2]["message"] == "Node 1 connection failed"


def test_the_workers_own_lines_and_kafka_info_are_never_held_back(written):
    handler, lines = written
    for i in range(5):
        handler.handle(record("stream_worker.streaming.batch", "dead-lettering %s", (f"t[0]@{i}",), created=1000 + i))
        handler.handle(record("kafka.conn", "connected to %s", ("b",), created=1000 + i, level=logging.INFO))
    assert len(lines()) == 10


def test_held_repeats_are_written_when_another_line_comes_after_the_window_and_at_exit(written):
    handler, lines = written
    for created in (1000, 1000.5, 1001):
        handler.handle(record("kafka.producer.sender", "Got error produce response: %s", ("x",), created=created))
    handler.handle(record("stream_worker.streaming.worker", "partitions assigned", created=1010))
    assert len(lines()) == 2  # within the window, another logger's line does not end the run
    handler.handle(record("kafka.producer.sender", "Got error produce response: %s", ("x",), created=1020))
    handler.handle(record("stream_worker.streaming.worker", "consuming", created=1040))
    assert [line.get("repeated") for line in lines()] == [None, None, 3, None]
    handler.handle(record("kafka.producer.sender", "Got error produce response: %s", ("x",), created=1041))
    handler.handle(record("kafka.producer.sender", "Got error produce response: %s", ("x",), created=1042))
    handler.close()
    assert [line.get("repeated") for line in lines()][-2:] == [None, 1]  # 1041 opened a new run, 1042 held


def test_zero_seconds_writes_every_line():
    stream = io.StringIO()
    handler = RepeatSummarizingHandler(stream, seconds=0)
    for i in range(3):
        handler.handle(record("kafka.coordinator", COORDINATOR_DEAD, ("c", "g", "e"), created=1000 + i / 10))
    assert len(stream.getvalue().splitlines()) == 3


def test_setup_logging_installs_the_summarising_handler_with_the_configured_window():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(LoggingConfig(format="text", repeat_summary_seconds=12.5))
        (handler,) = root.handlers
        assert isinstance(handler, RepeatSummarizingHandler) and handler.seconds == 12.5
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
