"""The worker's loop against a fake consumer and producer (unit level; the real-broker tests are
in test_worker_kafka.py and test_reliability.py): how it overlaps the engine with collecting and
publishing, that offsets are committed strictly in order and only after acknowledgement, the
in-flight bound, how it polls while it waits, that it never leaves a group join unattended
between polls, rebalances and failures with batches in flight, and that every batch runs on the
one thread the engine was built on."""

from __future__ import annotations

import logging
import operator
import threading
import time

import pytest
from kafka.errors import KafkaError
from kafka.structs import ConsumerGroupMetadata, MemberState, TopicPartition

from stream_worker.config import load_config
from stream_worker.streaming import worker as worker_module
from stream_worker.streaming.batch import BatchResult, Inferred, Item, Outgoing, Prepared
from stream_worker.streaming.checkpoint import Checkpoint, ProducerUnusable
from stream_worker.streaming.metrics import Metrics
from stream_worker.streaming.worker import EngineThread, Worker
from tests.helpers import consumed

PARTITION = TopicPartition("in", 0)
OTHER = TopicPartition("in", 1)


class Sent:
    """A producer future: acknowledged at once, or when ``acknowledge`` is called."""

    def __init__(self, message, done: bool, error: Exception | None = None) -> None:
        self.message, self.is_done, self.exception, self.callbacks = message, done, error, []

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def add_both(self, callback):
        self.callbacks.append(callback) if not self.is_done else callback(None)
        return self

    def acknowledge(self) -> None:
        self.is_done = True
        for callback in self.callbacks:
            callback(None)


class FakeProducer:
    def __init__(self, acknowledge: bool = True, fail_first: int = 0) -> None:
        self.acknowledge, self.fail_first = acknowledge, fail_first
        self.sent: list[Sent] = []

    def send(self, topic, value=None, key=None, headers=None):
        error = RuntimeError("broker said no") if len(self.sent) < self.fail_first else None
        self.sent.append(Sent((topic, key, value), self.acknowledge or error is not None, error))
        return self.sent[-1]

    def flush(self, timeout=None) -> None:
        for future in self.sent:
            if not future.is_done:
                future.acknowledge()

    def close(self, timeout=None) -> None:
        pass


class FakeConsumer:
    """Serves ``messages`` from the positions of its unpaused assigned partitions (``seek`` moves
    them); sleeps through polls with nothing to return (as kafka-python does while everything
    is paused) and logs every poll and commit. ``on_poll(consumer)`` runs at each poll (to play a
    rebalance)."""

    def __init__(self, messages, on_poll=lambda consumer: None, partitions=(PARTITION,), commit_seconds=0.0) -> None:
        self.log: dict[TopicPartition, list] = {}
        for message in messages:
            self.log.setdefault(TopicPartition(message.topic, message.partition), []).append(message)
        self.positions = {tp: 0 for tp in self.log}
        self.on_poll = on_poll
        self.assigned = set(partitions)
        self.paused: set = set()
        self.events: list[tuple] = []
        self.polls: list[tuple[float, bool, int]] = []  # (time, everything paused, timeout_ms)
        self.seeks: list[tuple] = []
        self.commit_seconds = commit_seconds
        self.committed_at: float | None = None
        self.member_state = MemberState.STABLE  # what group_metadata() reports (cooperative joins)
        self.group_offsets: dict = {}

    def unread(self) -> int:
        return sum(len(self.log[tp]) - position for tp, position in self.positions.items())

    def assignment(self) -> set:
        return set(self.assigned)

    def pause(self, *partitions) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions) -> None:
        self.paused -= set(partitions)

    def seek(self, partition, offset) -> None:
        self.seeks.append((partition, offset))
        self.positions[partition] = offset

    def poll(self, timeout_ms=0, max_records=None):
        paused = bool(self.assigned) and self.assigned <= self.paused
        self.polls.append((time.monotonic(), paused, timeout_ms))
        if paused:
            self.events.append(("paused poll", timeout_ms))
        self.on_poll(self)
        polled: dict = {}
        budget = max_records or 500
        fetchable = sorted(tp for tp in self.assigned - self.paused if tp in self.log)
        while budget and any(self.positions[tp] < len(self.log[tp]) for tp in fetchable):
            for tp in fetchable:  # partitions in turn, as several fetch responses would interleave
                if budget and self.positions[tp] < len(self.log[tp]):
                    polled.setdefault(tp, []).append(self.log[tp][self.positions[tp]])
                    self.positions[tp] += 1
                    budget -= 1
        if not polled:
            time.sleep(timeout_ms / 1000)
        return polled

    def end_offsets(self, partitions, timeout_ms=None) -> dict:
        return {}

    def group_metadata(self):
        return ConsumerGroupMetadata(group_id="g", state=self.member_state)

    def position(self, partition, timeout_ms=None):
        return None

    def committed(self, partition, timeout_ms=None):
        """What the group has committed (``group_offsets``, set by a test), as the broker would say."""
        return self.group_offsets.get(partition)

    def unsubscribe(self) -> None:
        self.events.append(("unsubscribe",))

    def subscribe(self, topics, listener=None) -> None:
        self.events.append(("subscribe", tuple(topics)))

    def commit(self, offsets, timeout_ms=None) -> None:
        time.sleep(self.commit_seconds)
        for tp, offset in sorted(offsets.items()):
            self.events.append(("commit", tp.partition, offset.offset))
        self.committed_at = time.monotonic()

    def commits(self, partition: int = 0) -> list[int]:
        return [event[2] for event in self.events if event[0] == "commit" and event[1] == partition]


class SlowPipeline:
    """The pipeline's three stages, with an engine stage of fixed length; one result per message."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.engine_spans: list[tuple[float, float]] = []
        self.threads: list[threading.Thread] = []

    def prepare(self, messages) -> Prepared:
        return Prepared(messages, [], {})

    def infer(self, prepared) -> Inferred:
        self.threads.append(threading.current_thread())
        began = time.monotonic()
        time.sleep(self.seconds)
        self.engine_spans.append((began, time.monotonic()))
        return Inferred([], 0.0)

    def finish(self, prepared, inferred) -> BatchResult:
        return BatchResult([Item(TopicPartition(m.topic, m.partition), Outgoing("out", m.key, b"r", []))
                            for m in prepared.messages])

    @property
    def done_at(self) -> list[float]:
        return [end for _, end in self.engine_spans]


def worker_with(consumer, pipeline, engine: EngineThread | None = None, producer=None, **settings) -> Worker:
    environ = {f"STREAM_WORKER__{key.upper()}": str(value) for key, value in settings.items()}
    config = load_config(None, {"STREAM_WORKER__BATCHING__MAX_SPECTRA": "4", **environ})
    worker = Worker(config, pipeline, consumer, producer or FakeProducer(), Metrics(), lambda: None, engine)
    worker.assigned = consumer.assignment()
    return worker


def messages(n: int, partition: int = 0) -> list:
    return [consumed(b"x", key=b"k", offset=i, topic="in", partition=partition) for i in range(n)]


def run_until(worker: Worker, condition, timeout: float = 10.0) -> None:
    """Turns the worker's loop until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the worker did not get there"
        worker.step()


def committed(consumer: FakeConsumer, offset: int, partition: int = 0):
    return lambda: offset in consumer.commits(partition)


IN_FLIGHT = pytest.mark.parametrize("in_flight", [1, 2])


@IN_FLIGHT
def test_a_short_batch_is_committed_as_soon_as_it_ends(in_flight):
    """No poll the worker would sleep through stands between a batch's end and its commit: once
    a poll finds nothing, the worker waits for the engine instead of polling into its end (every
    poll lasts worker.poll_timeout_ms, here 0.5 s)."""
    consumer = FakeConsumer(messages(4))
    pipeline = SlowPipeline(0.6)
    worker = worker_with(consumer, pipeline, worker__max_batches_in_flight=in_flight, worker__poll_timeout_ms=500)
    run_until(worker, committed(consumer, 4))
    assert consumer.committed_at - pipeline.done_at[0] < 0.25
    assert {timeout for _, _, timeout in consumer.polls} == {500}  # never a shorter poll


@IN_FLIGHT
def test_a_long_batch_still_polls_for_the_group(monkeypatch, in_flight):
    """membership, rebalances, max_poll_interval: polls go on during a batch of any length."""
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.1)
    consumer = FakeConsumer(messages(4))
    pipeline = SlowPipeline(0.5)
    worker = worker_with(consumer, pipeline, worker__poll_timeout_ms=50, worker__max_batches_in_flight=in_flight)
    run_until(worker, committed(consumer, 4))
    began, ended = pipeline.engine_spans[0]
    times = [began] + [at for at, _, _ in consumer.polls if began < at < ended] + [ended]
    assert max(b - a for a, b in zip(times, times[1:])) < 0.3
    if in_flight == 1:  # at the bound: everything paused, one poll per interval
        assert 2 <= consumer.events.count(("paused poll", 50)) <= 5


def test_the_engine_works_on_the_next_batch_while_the_previous_is_committed():
    """With two batches in flight the engine never waits for the host's publish and commit; with
    one it waits for each."""
    gaps = {}
    for in_flight in (1, 2):
        consumer = FakeConsumer(messages(16), commit_seconds=0.15)
        pipeline = SlowPipeline(0.2)
        worker = worker_with(consumer, pipeline, worker__max_batches_in_flight=in_flight)
        run_until(worker, committed(consumer, 16))
        gaps[in_flight] = [b[0] - a[1] for a, b in zip(pipeline.engine_spans, pipeline.engine_spans[1:])]
    assert min(gaps[1]) >= 0.15, gaps  # idle through every commit
    assert max(gaps[2]) < 0.075, gaps  # the next batch was already waiting


@IN_FLIGHT
def test_offsets_are_committed_in_order_and_only_once_acknowledged(monkeypatch, in_flight):
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    producer = FakeProducer(acknowledge=False)
    consumer = FakeConsumer(messages(12))
    worker = worker_with(consumer, SlowPipeline(0.01), producer=producer, worker__max_batches_in_flight=in_flight,
                         worker__poll_timeout_ms=20)
    run_until(worker, lambda: len(producer.sent) >= 4 * in_flight and len(worker.batches) == in_flight)
    for _ in range(20):
        worker.step()
    assert consumer.commits() == [], "committed before the broker acknowledged"
    assert len(worker.batches) == in_flight and consumer.unread() == 12 - 4 * in_flight  # the bound holds
    assert consumer.paused == {PARTITION}
    producer.acknowledge = True
    for future in reversed(producer.sent):  # acknowledged newest first: still committed oldest first
        future.acknowledge()
    run_until(worker, committed(consumer, 12))
    assert consumer.commits() == [4, 8, 12]


@IN_FLIGHT
def test_a_failed_publication_rewinds_every_batch_in_flight(monkeypatch, in_flight):
    """The first batch's messages are refused: neither it nor any later batch is committed, the
    consumer goes back to the first uncommitted offset, and the batches are processed again."""
    producer = FakeProducer(fail_first=1)
    consumer = FakeConsumer(messages(8))
    worker = worker_with(consumer, SlowPipeline(0.05), producer=producer, worker__max_batches_in_flight=in_flight)
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_SECONDS", 0.0)
    run_until(worker, committed(consumer, 8))
    assert consumer.seeks == [(PARTITION, 0)] and consumer.commits() == [4, 8]
    assert len(producer.sent) >= 12  # the refused batch (and any published after it) published again


def test_a_rebalance_with_batches_in_flight_drops_the_lost_partitions_work(monkeypatch):
    """Partition 1 is revoked while both partitions' batches are in the engine: nothing of it is
    published or committed here; partition 0's work goes on and is committed."""
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    revoked = []

    def rebalance(consumer: FakeConsumer) -> None:
        if len(worker.batches) == 2 and not revoked:
            revoked.append(time.monotonic())
            worker.on_revoked({OTHER})
            consumer.assigned = {PARTITION}
            worker.on_assigned(set())

    inputs = [consumed(b"x", key=b"k", offset=i // 2, topic="in", partition=i % 2) for i in range(8)]
    consumer = FakeConsumer(inputs, on_poll=rebalance, partitions=(PARTITION, OTHER))
    producer = FakeProducer()
    worker = worker_with(consumer, SlowPipeline(0.3), producer=producer, worker__max_batches_in_flight=2)
    run_until(worker, lambda: revoked and not worker.batches)
    published = {(key, value) for _, key, value in (s.message for s in producer.sent)}
    assert len(producer.sent) == 4 and published == {(b"k", b"r")}  # partition 0's four results only
    assert consumer.commits(0)[-1] == 4 and consumer.commits(1) == []
    assert (OTHER, 2) not in consumer.seeks and (PARTITION, 4) in consumer.seeks  # kept: just past what it holds


def test_a_rebalance_in_progress_when_the_batch_ends_is_polled_through_before_publishing(monkeypatch):
    """kafka-python loses a group join answered while nobody polls: polls follow back to back
    from the revocation until the new assignment arrives, even after the batch has ended."""
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    pipeline = SlowPipeline(0.05)
    assigned_at: list[float] = []

    def rebalance(consumer: FakeConsumer) -> None:
        if worker.batches and not worker.rebalancing and not assigned_at:
            worker.on_revoked({PARTITION})
        elif pipeline.done_at and time.monotonic() > pipeline.done_at[0] + 0.2 and not assigned_at:
            assigned_at.append(time.monotonic())
            worker.on_assigned({PARTITION})

    consumer = FakeConsumer(messages(4), on_poll=rebalance)
    worker = worker_with(consumer, pipeline, worker__poll_timeout_ms=20, worker__max_batches_in_flight=1)
    run_until(worker, committed(consumer, 4))
    assert assigned_at, "the batch was published before the rebalance had completed"
    assert consumer.committed_at > assigned_at[0]
    rebalancing = [timeout for at, _, timeout in consumer.polls if at < assigned_at[0]][1:]
    assert min(rebalancing) == 20  # never a shorter poll while the join is in flight


def test_a_cooperative_join_is_polled_through_and_its_revocation_ends_it(monkeypatch):
    """Cooperative: no callback before the join, so the member's state says one is under way;
    polls follow back to back until it ends, and the revocation that ends it drops only the
    partition that moved, without waiting for an assignment that never comes."""
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    pipeline = SlowPipeline(0.05)
    joined_at: list[float] = []

    def rebalance(consumer: FakeConsumer) -> None:
        if worker.batches and not joined_at and consumer.member_state == MemberState.STABLE:
            consumer.member_state = MemberState.REBALANCING
        elif pipeline.done_at and time.monotonic() > pipeline.done_at[0] + 0.2 and not joined_at:
            joined_at.append(time.monotonic())
            consumer.member_state = MemberState.STABLE
            consumer.assigned = {PARTITION}
            worker.on_revoked({OTHER})  # kafka-python calls it after the join, with the moved partitions only

    inputs = [consumed(b"x", key=b"k", offset=i // 2, topic="in", partition=i % 2) for i in range(8)]
    consumer = FakeConsumer(inputs, on_poll=rebalance, partitions=(PARTITION, OTHER))
    worker = worker_with(consumer, pipeline, worker__poll_timeout_ms=20, worker__max_batches_in_flight=1,
                         kafka__rebalance_protocol="cooperative")
    run_until(worker, committed(consumer, 4))
    assert joined_at and consumer.committed_at > joined_at[0], "published while the join was under way"
    during = [timeout for at, _, timeout in consumer.polls if consumer.polls[1][0] < at < joined_at[0]]
    assert during and min(during) == 20
    assert not worker.rebalancing and worker.assigned == {PARTITION}
    assert consumer.commits(1) == []  # the moved partition's batch was dropped, not committed here


def test_a_rebalance_that_never_completes_does_not_hold_the_batch_forever(monkeypatch):
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)
    consumer = FakeConsumer(messages(4), on_poll=lambda c: worker.batches and not worker.rebalancing
                            and worker.rebalance_began == 0.0 and worker.on_revoked({PARTITION}))
    worker = worker_with(consumer, SlowPipeline(0.05), worker__poll_timeout_ms=20, kafka__session_timeout_ms=300,
                         kafka__max_poll_interval_ms=600)
    finished = threading.Event()
    threading.Thread(target=lambda: (run_until(worker, committed(consumer, 4)), finished.set()), daemon=True).start()
    assert finished.wait(10), "the worker waited for the rebalance beyond kafka.session_timeout_ms"


def test_a_join_lost_by_the_client_is_begun_again(monkeypatch):
    """kafka-python can lose a join: the member then waits for an assignment forever. Twice
    kafka.session_timeout_ms after it began, the worker leaves the group and subscribes again, and
    takes the new assignment."""
    monkeypatch.setattr(worker_module, "BUSY_POLL_INTERVAL_S", 0.01)

    def on_poll(consumer):
        if not worker.rebalancing and worker.rebalance_began == 0.0:
            worker.on_revoked({PARTITION})  # a join begins, and its answer never comes...
        elif ("subscribe", ("apogee.spectra",)) in consumer.events and worker.rebalancing:
            worker.on_assigned({PARTITION})  # ... until the worker joins again

    consumer = FakeConsumer(messages(4), on_poll=on_poll)
    worker = worker_with(consumer, SlowPipeline(0.01), worker__poll_timeout_ms=20, kafka__session_timeout_ms=300,
                         kafka__max_poll_interval_ms=600)
    run_until(worker, lambda: ("subscribe", ("apogee.spectra",)) in consumer.events and not worker.rebalancing,
              timeout=5)
    assert consumer.events.index(("unsubscribe",)) < consumer.events.index(("subscribe", ("apogee.spectra",)))
    assert worker.assigned == {PARTITION}
    run_until(worker, committed(consumer, 4))


def test_a_stop_request_drains_every_batch_in_flight_and_the_messages_in_hand():
    consumer = FakeConsumer(messages(10))
    worker = worker_with(consumer, SlowPipeline(0.1), worker__max_batches_in_flight=2)
    run_until(worker, lambda: len(worker.batches) == 2)
    worker._poll(max_records=1)  # one message collected for a third batch
    worker.request_stop()
    while worker._running():
        worker.step()
    assert consumer.commits()[-1] == 9 and not worker.batches


def test_every_batch_runs_on_the_thread_the_engine_was_built_on():
    """torch's OpenMP runtime slows every team down once more threads than CPUs hold one, so the
    model is built and every batch run on one long-lived thread, never the main thread."""
    engine = EngineThread()
    built_on = engine.submit(threading.current_thread).result()
    consumer = FakeConsumer(messages(8))
    pipeline = SlowPipeline(0.01)
    worker = worker_with(consumer, pipeline, engine)
    run_until(worker, committed(consumer, 8))
    assert pipeline.threads == [built_on, built_on]
    assert built_on is not threading.main_thread() and built_on.daemon  # an abandoned batch cannot hold the exit


def test_the_engine_thread_hands_failures_back_and_keeps_serving():
    engine = EngineThread()
    with pytest.raises(ZeroDivisionError):
        engine.submit(operator.truediv, 1, 0).result()
    assert engine.submit(operator.add, 1, 2).result() == 3


def test_the_checkpoint_reconciles_offsets_after_a_rebalance():
    """Lost partitions' uncommitted offsets are forgotten in every open batch (their new owner
    redoes the work); each kept partition resumes just past the last message still held, in a
    batch or collected for the next."""
    kept, lost, fresh = TopicPartition("in", 0), TopicPartition("in", 1), TopicPartition("in", 2)
    seeks = []
    consumer = type("Seeking", (), {"seek": lambda self, tp, offset: seeks.append((tp, offset))})()
    checkpoint = Checkpoint(consumer, FakeProducer(), exactly_once=False, flush_timeout_s=20)
    older = checkpoint.consumed([consumed(b"x", offset=o, topic="in", partition=p) for p, o in ((0, 10), (1, 5))])
    newer = checkpoint.consumed([consumed(b"x", offset=o, topic="in", partition=p) for p, o in ((0, 11), (1, 6))])
    held = [consumed(b"x", offset=12, topic="in", partition=0), consumed(b"x", offset=3, topic="in", partition=2)]
    checkpoint.reconcile({kept, fresh}, held)
    assert sorted(seeks) == [(kept, 13), (fresh, 4)]
    assert older.next == {kept: 11} and newer.next == {kept: 12} and len(checkpoint) == 2
    with pytest.raises(RuntimeError, match="in the order"):
        checkpoint.commit(newer, [])


class TransactionalProducer(FakeProducer):
    """Records transactions; ``wedged`` plays kafka-python's error state after a lost coordinator:
    the commit times out, and then neither abort nor begin works again."""

    def __init__(self, wedged: bool = False) -> None:
        super().__init__()
        self.wedged, self.closed = wedged, False
        self.committed: list[dict] = []
        self.offsets: dict = {}

    def begin_transaction(self) -> None:
        if self.wedged and self.committed is None:
            raise KafkaError("Cannot execute transactional method because we are in an error state")

    def send_offsets_to_transaction(self, offsets, group_metadata) -> None:
        self.offsets = {tp: o.offset for tp, o in offsets.items()}

    def commit_transaction(self) -> None:
        if self.wedged:
            self.committed = None  # from now on: the error state
            raise KafkaError("EndTxnRequest failed: RequestTimedOutError")
        self.committed.append(self.offsets)

    def abort_transaction(self) -> None:
        if self.wedged:
            raise KafkaError("Cannot execute transactional method because we are in an error state")

    def close(self, timeout=None) -> None:
        self.closed = True


def test_a_producer_left_unable_to_end_a_transaction_is_replaced_and_the_batch_redone(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="stream_worker")
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_SECONDS", 0.0)
    wedged, replacements = TransactionalProducer(wedged=True), []

    def new_producer():
        replacements.append(TransactionalProducer())
        return replacements[-1]

    consumer = FakeConsumer(messages(8))
    worker = worker_with(consumer, SlowPipeline(0.01), producer=wedged, kafka__delivery="exactly_once",
                         worker__max_batches_in_flight=1)
    worker.new_producer = new_producer
    run_until(worker, lambda: replacements and replacements[0].committed[-1:] == [{PARTITION: 8}])
    assert wedged.closed and len(replacements) == 1 and worker.checkpoint.producer is replacements[0]
    assert [c[PARTITION] for c in replacements[0].committed] == [4, 8]  # the failed batch redone, then the next
    assert worker.metrics.producer_replacements._value.get() == 1
    assert "the batches in flight are done again" in caplog.text and "committed after all" not in caplog.text


def test_a_transaction_that_committed_although_its_end_failed_is_not_redone(monkeypatch, caplog):
    """The transaction's end reached the coordinator but its answer was lost: the batch is
    committed. After the replacement the worker resumes from the group's committed offsets, not
    from its own record, so the batch is not published a second time."""
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_SECONDS", 0.0)
    consumer = FakeConsumer(messages(8))

    class CommittedThenWedged(TransactionalProducer):
        def commit_transaction(self) -> None:
            consumer.group_offsets.update(self.offsets)  # it did commit...
            super().commit_transaction()  # ... but the client saw a timeout, and then its error state

    replacements = []

    def new_producer():
        replacements.append(TransactionalProducer())
        return replacements[-1]

    worker = worker_with(consumer, SlowPipeline(0.01), producer=CommittedThenWedged(wedged=True),
                         kafka__delivery="exactly_once", worker__max_batches_in_flight=1)
    worker.new_producer = new_producer
    run_until(worker, lambda: replacements and replacements[0].committed[-1:] == [{PARTITION: 8}])
    assert (PARTITION, 4) in consumer.seeks
    assert [c[PARTITION] for c in replacements[0].committed] == [8]  # only the second batch
    assert len(replacements[0].sent) == 4
    assert f"committed after all: {PARTITION.topic}[{PARTITION.partition}] at 4 resume past it" in caplog.text


def test_without_a_way_to_replace_the_producer_the_worker_exits_non_zero(monkeypatch):
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_SECONDS", 0.0)
    worker = worker_with(FakeConsumer(messages(4)), SlowPipeline(0.01), producer=TransactionalProducer(wedged=True),
                         kafka__delivery="exactly_once")
    worker.consumer.subscribe = lambda topics, listener=None: None
    worker.consumer.partitions_for_topic = lambda topic: {0}
    worker.consumer.close = lambda autocommit=False: None
    exit_codes: list[int] = []
    running = threading.Thread(target=lambda: exit_codes.append(worker.run()), daemon=True)
    running.start()
    running.join(10)
    assert exit_codes == [1], "the worker kept going with a producer it cannot use"


def test_a_producer_that_cannot_be_replaced_in_time_ends_the_worker(monkeypatch):
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_SECONDS", 0.0)

    def broker_gone():
        raise KafkaError("init_transactions timed out")

    worker = worker_with(FakeConsumer(messages(4)), SlowPipeline(0.01), producer=TransactionalProducer(wedged=True),
                         kafka__delivery="exactly_once", worker__producer_rebuild_seconds=1)
    worker.new_producer = broker_gone
    with pytest.raises(ProducerUnusable, match="aborting the transaction failed.*making a new producer failed for 1 s"):
        run_until(worker, lambda: False, timeout=5)


def test_a_transaction_end_the_coordinator_never_answers_fails_the_batch_in_bounded_time():
    """kafka-python's commit_transaction() waits for the coordinator without a bound; the worker
    waits worker.commit_timeout_seconds, then the batch fails, and the producer, which can no
    longer abort, is marked for replacement."""
    from kafka.errors import KafkaTimeoutError
    from kafka.producer.transaction_manager import TransactionalRequestResult

    class Unanswered:
        """kafka-python's transaction manager with a coordinator that never answers."""

        def __init__(self) -> None:
            self.committing = False

        def send_offsets_to_transaction(self, offsets, group_metadata):
            answered = TransactionalRequestResult()
            answered.done()
            return answered

        def begin_commit(self):
            self.committing = True
            return TransactionalRequestResult()  # never done

        def begin_abort(self):
            if self.committing:
                raise KafkaError("TransactionalState: invalid transition from COMMITTING_TRANSACTION")
            return TransactionalRequestResult()

    producer = TransactionalProducer()
    producer._transaction_manager = Unanswered()
    producer._sender = type("Sender", (), {"wakeup": lambda self: None})()
    consumer = FakeConsumer(messages(4))
    checkpoint = Checkpoint(consumer, producer, exactly_once=True, flush_timeout_s=0.2)
    batch = checkpoint.consumed(messages(4))
    sent = checkpoint.publish([Outgoing("out", b"k", b"r", [])])
    started = time.monotonic()
    with pytest.raises(KafkaTimeoutError, match="commit_transaction: no answer from the transaction coordinator"):
        checkpoint.commit(batch, sent)
    assert time.monotonic() - started < 2
    checkpoint.rewind()
    assert checkpoint.unusable and "aborting the transaction failed" in checkpoint.unusable
