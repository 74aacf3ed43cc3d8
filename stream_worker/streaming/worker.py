"""The streaming worker's loop. Each micro-batch goes collect → prepare (decode, validate) →
infer (on the engine thread) → finish (records) → publish → commit, and up to
``worker.max_batches_in_flight`` batches are on that way at once: while the engine computes one,
the main thread collects and prepares the next and publishes and commits the previous ones, so
a fast engine (a GPU) is not left idle during the host's round trips.

The main thread owns the Kafka consumer and turns the loop (:meth:`Worker.step`): it retires
what the engine has finished (records, publish, commit: strictly in consumption order), then,
while fewer than the bound are in flight, polls for the next batch (``batching.max_spectra``
messages, or whatever arrived within ``batching.max_wait_seconds`` of the first) and hands it
to the engine. At the bound every partition is *paused* — nothing more is fetched
(backpressure) — and it waits for the engine or the broker's acknowledgements, still polling
once a second (back to back during a rebalance), so the member stays in its group however slow
a batch, rebalances are served and SIGTERM is seen.

The :class:`~stream_worker.streaming.checkpoint.Checkpoint` makes every offset decision. When a
rebalance takes partitions away, the uncommitted work of those partitions is dropped at any
stage — not published if it was not yet, never committed here — and their new owner processes
it from the last commit, so nothing is committed that was not published. Exactly-once: one
transaction per batch, committed in order, and a batch's transaction begins only once the
previous one is committed; the engine then overlaps collecting and preparing, while publishing
waits its turn.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from kafka.errors import ProducerFencedError
from kafka.structs import TopicPartition

from stream_worker.config import Config
from stream_worker.streaming.batch import BatchResult, Pipeline, Prepared
from stream_worker.streaming.checkpoint import BatchOffsets, Checkpoint, ProducerUnusable
from stream_worker.streaming.kafka_clients import Rebalance, joining, member_ready, partition_lag
from stream_worker.streaming.metrics import Metrics, forget_lag, show_lag
from stream_worker.streaming.progress import Progress, join_overdue
from stream_worker.streaming.replay import ReplayRange

log = logging.getLogger(__name__)

LAG_REFRESH_SECONDS = 5.0
RETRY_BACKOFF_SECONDS = 1.0
BUSY_POLL_INTERVAL_S = 1.0
"""While the worker waits at the in-flight bound and no rebalance is in progress, the consumer is
polled this often, not back to back: a finished batch is then noticed at once instead of at the end
of a poll, which kafka-python sleeps through while partitions are paused (back-to-back polls cost
the I/O path ~30%)."""


class EngineThread:
    """One long-lived daemon thread for all of the engine's work: building the model and every
    batch. torch's CPU kernels run on libgomp, which gives each thread that starts parallel work a
    team of its own and, once a process holds more OpenMP threads than CPUs, throttles their
    spin-waiting between operations: with the model built on the main thread and each batch on a
    fresh thread, the engine ran ~30% slower in the worker than alone (its two threads 85% and 74%
    busy instead of 99% and 93%). Daemon: a batch abandoned at shutdown must not keep the process
    alive."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="engine", daemon=True).start()

    def submit(self, function, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, function, args))
        return future

    def _serve(self) -> None:
        while True:
            future, function, args = self._tasks.get()
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # handed to the main thread, which decides
                future.set_exception(exc)


@dataclass
class Batch:
    """One micro-batch on its way: in the engine → finished (``result``) → published (``sent``,
    the producer's futures) → committed (then it leaves the worker)."""

    offsets: BatchOffsets
    prepared: Prepared
    job: concurrent.futures.Future
    submitted: float
    result: BatchResult | None = None
    sent: list | None = None


class Worker:
    def __init__(self, config: Config, pipeline: Pipeline, consumer, producer, metrics: Metrics,
                 broker_problem: Callable[[], str | None], engine: EngineThread | None = None,
                 replay: ReplayRange | None = None, new_producer: Callable[[], object] | None = None) -> None:
        """``engine``: the thread the pipeline's engine was built on (a new one if not given).
        ``replay``: process only this range of offsets, then stop (``stream-worker replay``).
        ``new_producer``: makes a producer like ``producer``, to replace one that a broker failure
        left unusable (exactly-once); without it such a failure ends the worker."""
        self.config = config
        self.pipeline = pipeline
        self.engine = engine or EngineThread()
        self.consumer = consumer
        self.new_producer = new_producer
        self.metrics = metrics
        self.checkpoint = Checkpoint(consumer, producer, exactly_once=config.kafka.delivery == "exactly_once",
                                     flush_timeout_s=config.worker.commit_timeout_seconds)
        self.max_in_flight = config.worker.max_batches_in_flight
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None
        self.batches: deque[Batch] = deque()  # in consumption order
        self.pending: list = []  # collected for the next batch
        self.collect_deadline: float | None = None
        self.paused = False
        self.wakeup = threading.Event()  # the engine finished a batch, or the broker answered
        self.last_poll = 0.0
        self.last_poll_empty = False
        self.rebalanced = threading.Event()
        self.cooperative = config.kafka.rebalance_protocol == "cooperative"
        self.rebalancing = False  # a group join is under way (eager: partitions revoked, not yet reassigned)
        self.rebalance_began, self.rebalance_warned = 0.0, False
        self.joining_since = 0.0  # when the join under way began, however often it was begun again
        self.broker_problem = broker_problem
        self.last_lag_refresh = 0.0
        self.lag: dict[TopicPartition, int] = {}  # as last read, of the partitions owned
        self.progress = Progress()
        self.assigned: set = set()
        self.replay = replay
        self.finished: set[TopicPartition] = set()  # replay: partitions past the range's end, kept paused

    # ------------------------------------------------------------------ lifecycle

    def ready(self) -> tuple[bool, str]:
        """/readyz: partitions assigned, a broker usable, the producer usable, and a batch
        committed within ``worker.ready_stall_seconds`` while work waits."""
        ok, why = member_ready(self.assigned, self.broker_problem)
        if not ok:
            return ok, why
        if self.checkpoint.unusable:
            return False, f"replacing the transactional producer ({self.checkpoint.unusable})"
        stalled = self.progress.stalled(self.config.worker.ready_stall_seconds, "worker.ready_stall_seconds")
        return (False, stalled) if stalled else (True, "ready")

    def live(self) -> tuple[bool, str]:
        """/healthz: fails once work has waited ``worker.live_stall_seconds`` without a committed
        batch, or a group join has lasted that long (kafka-python 3.0.12 can lose one, and the
        member then never gets partitions again), so that Kubernetes restarts a worker wedged in a
        way it cannot heal itself."""
        bound, setting = self.config.worker.live_stall_seconds, "worker.live_stall_seconds"
        why = (self.progress.stalled(bound, setting)
               or join_overdue(self.joining_since if self.rebalancing else None, bound, setting))
        return (False, why) if why else (True, "ok")

    def request_stop(self, *_signal_args) -> None:
        """SIGTERM/SIGINT: stop fetching; finish, publish and commit every batch in flight (and the
        messages in hand) within the grace period."""
        if not self.stopping.is_set():
            log.info("stop requested: draining (grace %.0f s)", self.config.worker.shutdown_grace_seconds)
            self.stop_deadline = time.monotonic() + self.config.worker.shutdown_grace_seconds
            self.stopping.set()

    def run(self) -> int:
        """Subscribes, then turns the loop (:meth:`step`) until SIGTERM and the drain."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        for topic in self.config.kafka.input_topics:
            # Known partitions before the first join: a group leader without the topic's metadata
            # assigns nothing, and the rejoin that follows can stall the group.
            if not self.consumer.partitions_for_topic(topic):
                log.warning("input topic %s does not exist (yet); waiting for it to appear", topic)
        self._subscribe()
        log.info("consuming %s as group %s (%s, up to %d batches in flight)", self.config.kafka.input_topics,
                 self.config.kafka.group_id, self.config.kafka.delivery, self.max_in_flight)
        self.metrics.ready.set_function(lambda: int(self.ready()[0]))
        self.metrics.stalled.set_function(self.progress.stalled_seconds)
        exit_code = 0
        try:
            while self._running():
                self.step()
        except ProducerFencedError:
            log.error("another worker took over this transactional id; exiting")
            exit_code = 1
        except ProducerUnusable as exc:
            log.error("no usable producer (%s); exiting so that the pod is restarted", exc)
            exit_code = 1
        finally:
            self._close()
        return exit_code

    def step(self) -> None:
        """One turn of the loop: retire what is done, then collect while there is room, else wait."""
        self._retire()
        if len(self.batches) < self.max_in_flight and not self.stopping.is_set():
            self._collect()
        else:
            self._wait()
        if not self.rebalancing:
            self._refresh_lag()
        self.progress.note(len(self.checkpoint) + len(self.pending) + sum(self.lag.values()))

    def _running(self) -> bool:
        """Until a stop request; then until every batch in flight, and the messages in hand, is
        committed, or the grace period is over (what is left is redelivered)."""
        if self.replay is not None and not self.stopping.is_set() and self.replay.done():
            log.info("replay complete: %d spectra, %d dead letters", self.replay.spectra, self.replay.dead_letters)
            self.stopping.set()
        if not self.stopping.is_set():
            return True
        if self.pending:
            self._submit()
        if not self.batches:
            return False
        if self._past_stop_deadline():
            log.warning("grace period over with %d batch(es) of %d spectra in flight: abandoning them uncommitted "
                        "(they will be redelivered)", len(self.batches), len(self.checkpoint))
            return False
        return True

    def _past_stop_deadline(self) -> bool:
        return self.stop_deadline is not None and time.monotonic() > self.stop_deadline

    def _close(self) -> None:
        self.metrics.ready.set_function(lambda: 0)
        self.consumer.close(autocommit=False)
        self.checkpoint.producer.close(timeout=10)
        log.info("stopped")

    # ------------------------------------------------------------------ collect, prepare, infer

    def _poll(self, max_records: int | None = None) -> None:
        """The one place records arrive: they join ``pending``; a rebalance is reconciled after
        they are, so the positions the checkpoint restores account for them.

        kafka-python 3.0.12 loses a group join whose answer arrives while no poll awaits it (the
        member then believes it joined but never takes its assignment and stops its heartbeats),
        so from a revocation to the new assignment polls follow back to back, every one of them
        ``worker.poll_timeout_ms`` long (a join answered as a poll times out is lost too)."""
        timeout_ms = self.config.worker.poll_timeout_ms
        polled = [self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)]
        self.last_poll_empty = not polled[0]
        self._note_join()
        while self.rebalancing and not self._rebalance_overdue() and not self._past_stop_deadline():
            # a join is in flight: the next poll follows at once, before any other work (the
            # broker may hold a join for seconds while the other members rejoin)
            polled.append(self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records))
            self._note_join()
        if self._join_lost():
            self._rejoin()
        self.last_poll = time.monotonic()
        for batch in polled:
            for messages in batch.values():
                for message in messages:
                    if self.replay is not None and self.replay.beyond(message):
                        self._finish_partition(message)
                        continue
                    self.pending.append(message)
                    self.metrics.messages_consumed.labels(topic=message.topic).inc()
        if self.rebalanced.is_set():
            self._after_rebalance()
        self._show_in_flight()

    def _collect(self) -> None:
        """One step towards the next batch; hands the batch to the engine once it is full, or
        ``max_wait_seconds`` after its first message.

        Every poll lasts ``worker.poll_timeout_ms`` (it returns at once when records are there):
        kafka-python 3.0.12 loses a group join begun in a poll that ends before the join does,
        and a join may begin in any poll. So when the last poll found nothing and a batch is in
        flight (or due), the worker does not poll into it: it waits for the engine, the broker's
        acknowledgements or the batch's deadline, polling again for the group once a second."""
        self._pause(False)
        batching = self.config.batching
        budget = max(1, batching.max_spectra - len(self.pending))
        if self.last_poll_empty and (self.batches or self.collect_deadline is not None) and not self.rebalancing:
            until = self.last_poll + BUSY_POLL_INTERVAL_S
            if self.collect_deadline is not None:
                until = min(until, self.collect_deadline)
            if self._woken_before(until):
                return  # the engine or the broker is done with something: retire it first
            if self.collect_deadline is None or time.monotonic() < self.collect_deadline:
                self._poll(max_records=budget)
        else:
            self._poll(max_records=budget)
        now = time.monotonic()
        if self.pending and self.collect_deadline is None:
            self.collect_deadline = now + batching.max_wait_seconds
        if len(self.pending) >= batching.max_spectra or (self.pending and now >= self.collect_deadline):
            self._submit()

    def _submit(self) -> None:
        """The collected messages become a batch: prepared here, inferred on the engine thread."""
        messages, self.pending, self.collect_deadline = self.pending, [], None
        offsets = self.checkpoint.consumed(messages)  # from here on these offsets are the batch's to commit
        self.metrics.batch_size.observe(len(messages))
        prepared = self.pipeline.prepare(messages)
        job = self.engine.submit(self.pipeline.infer, prepared)
        job.add_done_callback(lambda _: self.wakeup.set())
        self.batches.append(Batch(offsets, prepared, job, time.monotonic()))
        self._show_in_flight()

    def _wait(self) -> None:
        """At the bound, or draining: nothing is fetched. Waits for the engine or the broker's
        acknowledgements, polling for the group once every ``BUSY_POLL_INTERVAL_S`` (back to back
        during a rebalance)."""
        self._pause(True)
        if self.rebalancing or not self._woken_before(self.last_poll + BUSY_POLL_INTERVAL_S):
            self._poll()

    def _woken_before(self, until: float) -> bool:
        """Waits until the monotonic time ``until`` for the engine or the broker; True as soon as
        one of them is done with something (a finished batch, acknowledgements)."""
        remaining = until - time.monotonic()
        return remaining > 0 and self.wakeup.wait(remaining)

    def _pause(self, paused: bool) -> None:
        if paused != self.paused:
            partitions = self.consumer.assignment() - self.finished
            (self.consumer.pause if paused else self.consumer.resume)(*partitions)
            self.paused = paused

    def _finish_partition(self, message) -> None:
        """Replay: a message past the range's end is dropped, and its partition fetches no more
        (until a rewind or rebalance moves it back into the range)."""
        tp = TopicPartition(message.topic, message.partition)
        if tp not in self.finished:
            self.finished.add(tp)
            self.consumer.pause(tp)

    # ------------------------------------------------------------------ finish, publish, commit

    def _retire(self) -> None:
        """Finishes what the engine is done with (records), publishes it, and commits the
        acknowledged batches, oldest first. A failure at any stage leaves every batch in flight
        uncommitted and rewinds, so they are processed again, never lost."""
        self.wakeup.clear()
        if self.rebalancing and not self._rebalance_overdue():
            return  # a group join is in flight: nothing may keep the main thread from its polls
        exactly_once = self.checkpoint.exactly_once
        stage = "engine"
        try:
            for batch in self.batches:
                if batch.result is None:
                    if not batch.job.done():
                        break
                    stage = "engine"
                    inferred = batch.job.result()
                    stage = "records"
                    batch.result = self.pipeline.finish(batch.prepared, inferred).only_from(self.consumer.assignment())
                if batch.sent is None and not exactly_once:
                    stage = "publish"
                    batch.sent = self.checkpoint.publish(batch.result.outgoing, self.wakeup.set)
            while self.batches and self.batches[0].result is not None:
                head = self.batches[0]
                if head.sent is None:  # exactly-once: this batch's transaction begins now
                    stage = "publish"
                    head.sent = self.checkpoint.publish(head.result.outgoing)
                elif not self.checkpoint.acknowledged(head.sent):
                    break
                stage = "commit"
                self.checkpoint.commit(head.offsets, head.sent)
                self.batches.popleft()
                self._count(head)
        except ProducerFencedError:
            raise
        except Exception as exc:
            if stage == "engine":
                log.exception("engine failed on a whole batch; it will be consumed again")
            else:
                log.error("%s failed (%s: %s); the batches in flight stay uncommitted and will be processed again",
                          stage, type(exc).__name__, exc)
            self.metrics.batch_failures.labels(stage=stage).inc()
            self.progress.failed()
            rewound = self._rewind()
            if self.checkpoint.unusable:
                self._replace_producer(rewound)
            time.sleep(RETRY_BACKOFF_SECONDS)

    def _replace_producer(self, rewound: dict[TopicPartition, int]) -> None:
        """kafka-python leaves a transactional producer that could not end a transaction (a
        coordinator lost mid-commit) in an error state for good: every later batch would fail
        while the process looks healthy. A new producer with the same transactional id fences the
        old one and settles what it left open; the batches not committed are then done again. If
        that cannot be done within ``worker.producer_rebuild_seconds``, ProducerUnusable ends the
        worker."""
        reason = self.checkpoint.unusable
        if self.new_producer is None:
            raise ProducerUnusable(reason)
        log.error("the transactional producer is unusable (%s): replacing it", reason)
        try:
            self.checkpoint.producer.close(timeout=0)
        except Exception as exc:
            log.warning("closing the old producer failed: %s: %s", type(exc).__name__, exc)
        deadline = time.monotonic() + self.config.worker.producer_rebuild_seconds
        self.checkpoint.replace_producer(self._retry_until(deadline, reason, "making a new producer", self.new_producer))
        self.metrics.producer_replacements.inc()
        committed = self._retry_until(deadline, reason, "reading the committed offsets", self._seek_to_committed)
        after_all = {tp: offset for tp, offset in committed.items() if offset > rewound.get(tp, offset)}
        if after_all:
            log.warning("a new transactional producer took over; the transaction that failed was committed after "
                        "all: %s resume past it", ", ".join(f"{tp.topic}[{tp.partition}] at {offset}"
                                                                 for tp, offset in sorted(after_all.items())))
        else:
            log.info("a new transactional producer took over; the batches in flight are done again")

    def _seek_to_committed(self) -> dict[TopicPartition, int]:
        """The transaction that failed may have been committed after all (its end reached the
        coordinator, the answer did not come back); the new producer's initialisation settled it
        one way or the other. So every partition resumes from the offsets the group has committed,
        not from the worker's own record, which would publish a committed batch twice. Returns
        those offsets."""
        committed = {}
        for tp in self.consumer.assignment():
            offset = self.consumer.committed(tp, timeout_ms=self.config.kafka.request_timeout_ms)
            if offset is not None:
                self.consumer.seek(tp, offset)
                committed[tp] = offset
        return committed

    def _retry_until(self, deadline: float, reason: str, what: str, action: Callable[[], object]):
        """``action()``, again after each failure until ``deadline`` (then ProducerUnusable)."""
        while True:
            try:
                return action()
            except ProducerFencedError:
                raise
            except Exception as exc:
                if time.monotonic() > deadline or self._past_stop_deadline():
                    raise ProducerUnusable(f"{reason}; {what} failed for "
                                           f"{self.config.worker.producer_rebuild_seconds:.0f} s: "
                                           f"{type(exc).__name__}: {exc}") from exc
                log.error("%s failed (%s: %s); trying again", what, type(exc).__name__, exc)
                time.sleep(RETRY_BACKOFF_SECONDS)

    def _rewind(self) -> dict[TopicPartition, int]:
        """Abandons every batch in flight and the messages in hand; the consumer goes back to the
        first uncommitted message of each partition (returned). An abandoned batch still in the
        engine ends there unheeded."""
        rewound = self.checkpoint.rewind(self.pending)
        self._unfinish()
        self.batches.clear()
        self.pending, self.collect_deadline = [], None
        self._show_in_flight()
        return rewound

    def _count(self, batch: Batch) -> None:
        now = time.time()
        records = batch.result.records
        self.metrics.spectra_processed.inc(len(records))
        self.metrics.inference_seconds.observe(batch.result.inference_seconds)
        self.metrics.count_published(records)
        for dead in batch.result.dead_letters:
            self.metrics.dead_letters.labels(reason=dead.reason).inc()
        for record in records:
            if record.get("input_timestamp_ms"):
                self.metrics.latency.observe(max(0.0, now - record["input_timestamp_ms"] / 1000))
        self.metrics.last_success.set(now)
        self.progress.committed()
        if self.replay is not None:
            self.replay.record(batch.offsets.next, len(records), len(batch.result.dead_letters))
        elapsed = time.monotonic() - batch.submitted
        self.metrics.batch_seconds.observe(elapsed)
        if elapsed > 0.5 * self.config.kafka.max_poll_interval_ms / 1000:
            log.warning("batch took %.1f s, over half of kafka.max_poll_interval_ms", elapsed)
        self._show_in_flight()

    def _unfinish(self) -> None:
        """After a seek back (a rewind, a rebalance), replayed partitions fetch again to their end."""
        if self.finished:
            if not self.paused:
                self.consumer.resume(*(self.finished & self.consumer.assignment()))
            self.finished.clear()

    def _show_in_flight(self) -> None:
        self.metrics.in_flight.set(len(self.checkpoint) + len(self.pending))
        self.metrics.batches_in_flight.set(len(self.batches))

    # ------------------------------------------------------------------ rebalance

    def on_revoked(self, revoked) -> None:
        """Runs on kafka-python's IO thread, which also drives heartbeats: it must not block,
        so it only takes note. The main thread reconciles after its next poll. Eager: every
        partition goes before the join, and the join lasts until the new assignment. Cooperative:
        only the partitions that move go, once the join is complete (:meth:`_note_join` saw it begin)."""
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))
        self.assigned -= set(revoked)
        if not self.cooperative:
            self._began_join()
        self.rebalanced.set()

    def on_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self.assigned |= set(assigned)
        self.rebalancing = False
        self.rebalanced.set()

    def _note_join(self) -> None:
        """Cooperative: no callback announces a join, so the member's state is read after each
        poll; the join is handled as an eager one is, polls back to back until it completes."""
        if self.cooperative:
            if joining(self.consumer):
                if not self.rebalancing:
                    self._began_join()
            else:
                self.rebalancing = False

    def _began_join(self) -> None:
        """A join begins (again, after :meth:`_rejoin`: ``joining_since`` keeps the first one's time)."""
        now = time.monotonic()
        if not self.rebalancing:
            self.joining_since = now
        self.rebalance_began, self.rebalance_warned = now, False
        self.rebalancing = True

    def _rejoin(self) -> None:
        """A join kafka-python lost never completes (the member waits for an assignment that never
        comes, and the group has evicted it long ago), so twice ``kafka.session_timeout_ms`` after
        it began the worker leaves the group and subscribes again, which begins a new join; what
        it still held is dropped, as in any rebalance."""
        log.warning("group join incomplete after twice kafka.session_timeout_ms: leaving and joining the group again")
        self.consumer.unsubscribe()
        self._subscribe()
        self.assigned = set()
        self.rebalanced.set()
        self._began_join()

    def _subscribe(self) -> None:
        self.consumer.subscribe(self.config.kafka.input_topics, listener=Rebalance(self))

    def _join_lost(self) -> bool:
        """The join under way has lasted twice ``kafka.session_timeout_ms``: begin it again (:meth:`_rejoin`)."""
        return self.rebalancing and time.monotonic() > self.rebalance_began + 2 * self.config.kafka.session_timeout_ms / 1000

    def _rebalance_overdue(self) -> bool:
        """A join kafka-python lost never completes; by ``kafka.session_timeout_ms`` after the
        revocation the group has evicted the stuck member, so the batches in flight go on."""
        overdue = time.monotonic() > self.rebalance_began + self.config.kafka.session_timeout_ms / 1000
        if overdue and not self.rebalance_warned:
            log.warning("rebalance still incomplete %.0f s after it began; going on with the batches in flight",
                        self.config.kafka.session_timeout_ms / 1000)
            self.rebalance_warned = True
        return overdue

    def _after_rebalance(self) -> None:
        """Abandons the uncommitted work of partitions this worker lost (their new owner redoes
        it: what is not yet published here never will be, and nothing of it is committed) and
        keeps going where it was on the partitions it kept: the checkpoint decides the offsets."""
        self.rebalanced.clear()
        owned = self.consumer.assignment()
        self.pending = [m for m in self.pending if TopicPartition(m.topic, m.partition) in owned]
        if not self.pending:
            self.collect_deadline = None
        for batch in self.batches:
            if batch.result is not None and batch.sent is None:
                batch.result = batch.result.only_from(owned)
        self.checkpoint.reconcile(owned, self.pending)
        self._unfinish()
        if self.paused:  # newly assigned partitions wait for the batches in flight too
            self.consumer.pause(*owned)
        forget_lag(self.metrics.consumer_lag, owned)
        self.lag = {tp: messages for tp, messages in self.lag.items() if tp in owned}
        self.progress.reassigned()
        self.last_lag_refresh = 0.0

    # ------------------------------------------------------------------ lag

    def _refresh_lag(self) -> None:
        """Lag per partition = end offset - position, every few seconds."""
        if time.monotonic() - self.last_lag_refresh < LAG_REFRESH_SECONDS or not self.assigned:
            return
        self.last_lag_refresh = time.monotonic()
        try:
            self.lag = partition_lag(self.consumer)
            show_lag(self.metrics.consumer_lag, self.lag)
        except Exception as exc:
            log.warning("cannot read partition end offsets for the lag: %s: %s", type(exc).__name__, exc)
