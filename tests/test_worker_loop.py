"""The worker's busy loop against a fake consumer (unit level; the real-broker tests are in
test_worker_kafka.py and test_reliability.py): how it polls while the engine works, that it
never leaves a group join unattended between polls, and that every batch runs on the one thread
the engine was built on."""

from __future__ import annotations

import operator
import threading
import time

import pytest
from kafka.structs import TopicPartition

from stream_worker.config import load_config
from stream_worker.streaming import worker as worker_module
from stream_worker.streaming.batch import BatchResult
from stream_worker.streaming.metrics import Metrics
from stream_worker.streaming.worker import EngineThread, Worker
from tests.helpers import consumed

PARTITION = TopicPartition("in", 0)


class Acknowledged:
    def succeeded(self) -> bool:
        return True


class FakeProducer:
    def send(self, *args, **kwargs):
        return Acknowledged()

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


class FakeConsumer:
    """Sleeps through polls while everything is paused, as kafka-python does; logs events.
    ``on_paused_poll(n)`` runs at the n-th poll made while paused (to play a rebalance)."""

    def __init__(self, messages, on_paused_poll=lambda n: None) -> None:
        self.messages = list(messages)
        self.on_paused_poll = on_paused_poll
        self.paused: set = set()
        self.events: list[tuple[str, object]] = []
        self.paused_polls = 0
        self.committed_at: float | None = None

    def assignment(self) -> set:
        return {PARTITION}

    def pause(self, *partitions) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions) -> None:
        self.paused -= set(partitions)

    def seek(self, partition, offset) -> None:
        pass

    def poll(self, timeout_ms=0, max_records=None):
        if self.paused:
            self.paused_polls += 1
            self.events.append(("paused poll", timeout_ms))
            self.on_paused_poll(self.paused_polls)
            time.sleep(timeout_ms / 1000)
            return {}
        if not self.messages:
            time.sleep(timeout_ms / 1000)
            return {}
        batch, self.messages = self.messages[:max_records], self.messages[max_records:]
        return {PARTITION: batch}

    def commit(self, offsets, timeout_ms=None) -> None:
        self.events.append(("commit", offsets[PARTITION].offset))
        self.committed_at = time.monotonic()


class SlowPipeline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.done_at: list[float] = []
        self.threads: list[threading.Thread] = []

    def run(self, messages) -> BatchResult:
        self.threads.append(threading.current_thread())
        time.sleep(self.seconds)
        self.done_at.append(time.monotonic())
        return BatchResult([])


def worker_with(consumer, pipeline, engine: EngineThread | None = None, **settings) -> Worker:
    environ = {f"STREAM_WORKER__{key.upper()}": str(value) for key, value in settings.items()}
    config = load_config(None, {"STREAM_WORKER__BATCHING__MAX_SPECTRA": "4", **environ})
    worker = Worker(config, pipeline, consumer, FakeProducer(), Metrics(), lambda: True, engine)
    worker.assigned = {PARTITION}
    return worker


def messages(n: int) -> list:
    return [consumed(b"x", key=b"k", offset=i, topic="in") for i in range(n)]


def one_batch(worker: Worker) -> None:
    worker.handle(worker.collect())


def test_a_short_batch_is_published_as_soon_as_it_ends_and_a_long_one_still_polls(monkeypatch):
    """Paused polls last their whole timeout: none during a batch shorter than the poll
    interval, one per interval during a longer one (membership, rebalances, max_poll_interval)."""
    short = FakeConsumer(messages(4))
    one_batch(worker_with(short, SlowPipeline(0.3)))
    assert short.events == [("commit", 4)]
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.1)
    long = FakeConsumer(messages(4))
    one_batch(worker_with(long, SlowPipeline(0.5), worker__poll_timeout_ms=50))
    assert 2 <= long.paused_polls <= 4  # ~0.15 s per interval + poll
    assert long.events[-1] == ("commit", 4)


def test_a_rebalance_in_progress_when_the_batch_ends_is_polled_through_before_publishing(monkeypatch):
    """kafka-python loses a group join answered while nobody polls: polls follow back to back
    from the revocation until the new assignment arrives, even after the batch has ended."""
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    pipeline = SlowPipeline(0.05)
    assigned_at: list[float] = []

    def rebalance(n: int) -> None:
        if n == 1:
            worker.on_revoked({PARTITION})
        elif pipeline.done_at and time.monotonic() > pipeline.done_at[0] + 0.2 and not assigned_at:
            assigned_at.append(time.monotonic())
            worker.on_assigned({PARTITION})

    consumer = FakeConsumer(messages(4), on_paused_poll=rebalance)
    worker = worker_with(consumer, pipeline, worker__poll_timeout_ms=20)
    one_batch(worker)
    assert assigned_at, "the batch was published before the rebalance had completed"
    assert consumer.committed_at > assigned_at[0]
    assert consumer.events[-1] == ("commit", 4)


def test_a_rebalance_that_never_completes_does_not_hold_the_batch_forever(monkeypatch):
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    consumer = FakeConsumer(messages(4), on_paused_poll=lambda n: n == 1 and worker.on_revoked({PARTITION}))
    worker = worker_with(consumer, SlowPipeline(0.05), worker__poll_timeout_ms=20, kafka__session_timeout_ms=300,
                         kafka__max_poll_interval_ms=600)
    finished = threading.Event()
    threading.Thread(target=lambda: (one_batch(worker), finished.set()), daemon=True).start()
    assert finished.wait(10), "the worker waited for the rebalance beyond kafka.session_timeout_ms"
    assert consumer.events[-1] == ("commit", 4)


def test_every_batch_runs_on_the_thread_the_engine_was_built_on():
    """torch's OpenMP runtime slows every team down once more threads than CPUs hold one, so the
    model is built and every batch run on one long-lived thread, never the main thread."""
    engine = EngineThread()
    built_on = engine.submit(threading.current_thread).result()
    pipeline = SlowPipeline(0.01)
    worker = worker_with(FakeConsumer(messages(8)), pipeline, engine)
    one_batch(worker)
    one_batch(worker)
    assert pipeline.threads == [built_on, built_on]
    assert built_on is not threading.main_thread() and built_on.daemon  # an abandoned batch cannot hold the exit


def test_the_engine_thread_hands_failures_back_and_keeps_serving():
    engine = EngineThread()
    with pytest.raises(ZeroDivisionError):
        engine.submit(operator.truediv, 1, 0).result()
    assert engine.submit(operator.add, 1, 2).result() == 3


def test_the_checkpoint_reconciles_offsets_after_a_rebalance():
    """Lost partitions' uncommitted offsets are forgotten (their new owner redoes the work); each
    kept partition resumes just past the last message still held, in the batch or collected."""
    from stream_worker.streaming.checkpoint import Checkpoint

    kept, lost, fresh = TopicPartition("in", 0), TopicPartition("in", 1), TopicPartition("in", 2)
    seeks = []
    consumer = type("Seeking", (), {"seek": lambda self, tp, offset: seeks.append((tp, offset))})()
    checkpoint = Checkpoint(consumer, FakeProducer(), exactly_once=False)
    for partition, offset in ((0, 10), (0, 11), (1, 5)):
        checkpoint.consumed(consumed(b"x", offset=offset, topic="in", partition=partition))
    held = [consumed(b"x", offset=12, topic="in", partition=0), consumed(b"x", offset=3, topic="in", partition=2)]
    checkpoint.reconcile({kept, fresh}, held)
    assert sorted(seeks) == [(kept, 13), (fresh, 4)]
    assert checkpoint.next_offsets == {kept: 12} and len(checkpoint) == 2
    assert lost not in checkpoint.first_offsets
