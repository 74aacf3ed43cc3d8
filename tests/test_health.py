"""Readiness and liveness that tell the truth: a worker whose batches keep failing, or a sink whose
transactions fail or hang, turns unready, then not live (so that Kubernetes restarts it), and both
recover once a batch is committed. Unit level with a fake clock; the real-broker versions are in
test_reliability.py and test_sink_kafka.py."""

from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request

import pytest
from kafka.structs import MemberState, TopicPartition

from stream_worker.config import ConfigError, load_config
from stream_worker.io.serializers import serializer
from stream_worker.sink.loop import Sink
from stream_worker.sink.metrics import SinkMetrics
from stream_worker.sink.rows import RowReader
from stream_worker.streaming import worker as worker_module
from stream_worker.streaming.metrics import HealthServer, Metrics
from stream_worker.streaming.progress import Progress
from tests.results import message_of, result_record
from tests.test_worker_loop import FakeConsumer, FakeProducer, SlowPipeline, committed, messages, run_until, worker_with


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_work_that_waits_without_a_commit_counts_as_stalled():
    clock = Clock()
    progress = Progress(clock)
    clock.now += 500
    progress.note(0)
    assert progress.stalled_seconds() == 0  # idle for long is not stalled
    progress.note(40)
    clock.now += 90
    assert progress.stalled_seconds() == 90
    assert progress.stalled(60, "worker.ready_stall_seconds") == (
        "no batch committed for 90 s while 40 messages wait (worker.ready_stall_seconds = 60 s)")
    assert progress.stalled(120, "worker.ready_stall_seconds") is None
    progress.committed()
    clock.now += 30
    assert progress.stalled_seconds() == 30  # counted from the commit, work still waiting


def test_a_failed_batch_counts_as_waiting_even_when_nothing_else_is_known_to():
    """After a rewind nothing is in flight, and the lag that would show the given-back messages
    may be unreadable from the broker that failed the batch."""
    clock = Clock()
    progress = Progress(clock)
    progress.failed()
    progress.note(0)
    clock.now += 200
    assert progress.stalled(100, "worker.live_stall_seconds").endswith(
        "while a failed batch waits to be redone (worker.live_stall_seconds = 100 s)")
    progress.reassigned()  # the partitions went to another member with the failed work
    assert progress.stalled_seconds() == 0


class Refusing(FakeProducer):
    """Refuses every message until ``refusing`` is cleared."""

    refusing = True

    def send(self, topic, value=None, key=None, headers=None):
        self.fail_first = len(self.sent) + 1 if self.refusing else 0
        return super().send(topic, value, key, headers)


def test_a_worker_whose_batches_keep_failing_turns_unready_then_not_live_and_recovers(monkeypatch):
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_SECONDS", 0.0)
    clock = Clock()
    producer = Refusing()
    consumer = FakeConsumer(messages(8))
    worker = worker_with(consumer, SlowPipeline(0.01), producer=producer, worker__max_batches_in_flight=1)
    worker.progress = Progress(clock)
    run_until(worker, lambda: worker.metrics.batch_failures.labels(stage="commit")._value.get() >= 2)
    assert worker.ready() == (True, "ready") and worker.live() == (True, "ok")
    clock.now += 121
    ok, why = worker.ready()
    assert not ok and why.startswith("no batch committed for 121 s while") and "worker.ready_stall_seconds" in why
    assert worker.live() == (True, "ok")
    clock.now += 180
    ok, why = worker.live()
    assert not ok and "no batch committed for 301 s" in why and "worker.live_stall_seconds = 300 s" in why
    producer.refusing = False
    run_until(worker, committed(consumer, 8))
    assert worker.ready() == (True, "ready") and worker.live() == (True, "ok")


def test_a_group_join_that_never_completes_fails_liveness():
    """kafka-python 3.0.12 can lose a join: the member then waits for partitions, with no lag of its
    own to show it stalled; if leaving and joining again does not help either, Kubernetes restarts it."""
    worker = worker_with(FakeConsumer(messages(4)), SlowPipeline(0.01))
    worker._began_join()
    assert worker.live() == (True, "ok")
    worker.joining_since -= 301
    worker._began_join()  # begun again (a rejoin): still the same join for liveness
    ok, why = worker.live()
    assert not ok and why == "group join incomplete for 301 s (worker.live_stall_seconds = 300 s)"
    worker.on_assigned([])
    assert worker.live() == (True, "ok")


def test_a_worker_replacing_its_producer_is_not_ready():
    worker = worker_with(FakeConsumer(messages(4)), SlowPipeline(0.01))
    worker.checkpoint.unusable = "aborting the transaction failed: KafkaError: error state"
    assert worker.ready() == (False, "replacing the transactional producer (aborting the transaction failed: "
                                     "KafkaError: error state)")


RESULTS = TopicPartition("apogee.results", 0)


class ResultsConsumer(FakeConsumer):
    """The results topic as the sink reads it: its lag is what remains unread."""

    def __init__(self, count: int) -> None:
        super().__init__([message_of(result_record(f"s{i}"), offset=i) for i in range(count)], partitions=(RESULTS,))

    def end_offsets(self, partitions, timeout_ms=None) -> dict:
        return {tp: len(self.log.get(tp, [])) for tp in partitions}

    def position(self, partition, timeout_ms=None):
        return self.positions.get(partition, 0)

    def commit_async(self, offsets) -> None:
        pass


class ResultStoreDouble:
    """Stores nothing; ``failing`` makes every transaction raise, ``during`` runs inside each one
    (what the health server's thread sees while the main thread is in the database)."""

    def __init__(self) -> None:
        self.failing = False
        self.during = lambda: None
        self.stored: list = []

    def offsets(self, topic) -> dict:
        return {}

    @contextlib.contextmanager
    def transaction(self):
        if self.failing:
            raise OSError("server closed the connection unexpectedly")
        yield self

    def upsert(self, rows) -> list:
        self.during()
        self.stored += rows
        return []

    def advance(self, offsets) -> None:
        pass


def sink_with(consumer, store, clock) -> Sink:
    config = load_config(None, {"STREAM_WORKER__SINK__RETRY_MAX_SECONDS": "0.001", "STREAM_WORKER__SINK__MAX_ROWS": "4"})
    sink = Sink(config, RowReader(serializer("json").decode), store, consumer, FakeProducer(), SinkMetrics(),
                lambda: None)
    sink.progress = Progress(clock)
    sink.on_assigned([RESULTS])
    return sink


def test_a_sink_whose_transactions_keep_failing_turns_unready_then_not_live_and_recovers():
    clock, store = Clock(), ResultStoreDouble()
    sink = sink_with(ResultsConsumer(8), store, clock)
    store.failing = True
    sink.step()
    sink.step()
    assert sink.ready() == (False, "storing failed: OSError: server closed the connection unexpectedly")
    assert sink.live() == (True, "ok")
    clock.now += 301
    ok, why = sink.live()
    assert not ok and why.startswith("no batch committed for 301 s while") and "sink.live_stall_seconds = 300 s" in why
    store.failing = False
    sink.step()
    sink.step()
    assert len(store.stored) == 8
    assert sink.ready() == (True, "ready") and sink.live() == (True, "ok")


def test_a_sink_hung_in_a_transaction_turns_unready_then_not_live():
    """A database that accepts connections but no longer answers: the main thread waits in the
    transaction and nothing fails, so only the clock can tell."""
    clock, store, seen = Clock(), ResultStoreDouble(), []

    def hang():
        for seconds in (121, 180):
            clock.now += seconds
            seen.append((sink.ready(), sink.live()))
    store.during = hang
    sink = sink_with(ResultsConsumer(4), store, clock)
    sink.step()
    (ready_121, live_121), (ready_301, live_301) = seen
    assert ready_121 == (False, "no batch committed for 121 s while 4 messages wait (sink.ready_stall_seconds = 120 s)")
    assert live_121 == (True, "ok")
    assert live_301 == (False, "no batch committed for 301 s while 4 messages wait (sink.live_stall_seconds = 300 s)")
    assert sink.ready() == (True, "ready") and sink.live() == (True, "ok")  # it came back and committed


def test_a_sink_whose_group_join_never_completes_fails_liveness():
    """kafka-python 3.0.12 can lose a join: the sink then waits for partitions with no lag of its
    own to show it stalled (its partitions went to the other replicas); Kubernetes restarts it."""
    consumer = ResultsConsumer(4)
    sink = sink_with(consumer, ResultStoreDouble(), Clock())
    consumer.member_state = MemberState.REBALANCING
    sink.step()
    assert sink.live() == (True, "ok")
    sink.joining_since -= 301
    sink.step()  # still the same join
    ok, why = sink.live()
    assert not ok and re.fullmatch(r"group join incomplete for 30\d s \(sink.live_stall_seconds = 300 s\)", why)
    consumer.member_state = MemberState.STABLE
    sink.step()
    assert sink.live() == (True, "ok")


def test_an_idle_sink_or_one_without_partitions_is_never_stalled():
    clock = Clock()
    sink = sink_with(ResultsConsumer(0), ResultStoreDouble(), clock)
    sink.step()
    clock.now += 1000
    assert sink.ready() == (True, "ready") and sink.live() == (True, "ok")
    sink.lag = 50  # results were waiting when every partition went to another sink
    sink.on_revoked([RESULTS])
    sink.step()
    clock.now += 1000
    assert sink.live() == (True, "ok") and sink.progress.stalled_seconds() == 0


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_probes_answer_503_with_the_reason():
    verdicts = {"live": (True, "ok"), "ready": (False, "no partitions assigned")}
    server = HealthServer(Metrics(), lambda: verdicts["ready"], "127.0.0.1", 0, lambda: verdicts["live"]).start()
    try:
        assert get(server.port, "/healthz") == (200, "ok\n")
        assert get(server.port, "/readyz") == (503, "no partitions assigned\n")
        verdicts["live"] = (False, "no batch committed for 301 s while 9 messages wait")
        assert get(server.port, "/healthz") == (503, "no batch committed for 301 s while 9 messages wait\n")
        assert "process_start_time_seconds" in get(server.port, "/metrics")[1]  # StreamWorkerRestarting's input
    finally:
        server.stop()


@pytest.mark.parametrize("section, setting, value", [
    ("worker", "live_stall_seconds", 100),  # below ready_stall_seconds (120)
    ("worker", "commit_timeout_seconds", 400),
    ("worker", "producer_rebuild_seconds", 300),
    ("sink", "live_stall_seconds", 100),
    ("sink", "retry_max_seconds", 300),
    ("sink", "connect_timeout_seconds", 600),
])
def test_liveness_must_outlast_what_the_worker_or_sink_waits_out_by_itself(section, setting, value):
    with pytest.raises(ConfigError, match=f"^{section}.live_stall_seconds: must exceed"):
        load_config(None, {f"STREAM_WORKER__{section.upper()}__{setting.upper()}": str(value)})
