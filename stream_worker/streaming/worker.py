"""The streaming worker's loop, a short explicit lifecycle per batch: :meth:`Worker.collect` →
:meth:`Worker.process` (decode → validate → infer → build records, on the engine thread) →
:meth:`Worker.publish` → :meth:`Worker.commit`.

The main thread owns the Kafka consumer. It collects a micro-batch (``batching.max_spectra``
messages, or whatever arrived within ``batching.max_wait_seconds`` of the first), hands it to
the engine thread, and while the engine works it keeps polling (once a second, back to back
during a rebalance) with every partition *paused*: no more data is fetched (backpressure), yet
the member stays in its group however slow the batch (a slow batch cannot make the group
thrash), rebalances are served, and SIGTERM is seen.
Results and dead letters are then published and the offsets committed by the
:class:`~stream_worker.streaming.checkpoint.Checkpoint`, which makes every offset decision. When
a rebalance takes partitions away, the uncommitted work of those partitions is dropped, at any
stage — neither published nor committed here — and their new owner processes it from the last
commit, so nothing is committed that was not published.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import signal
import threading
import time
from typing import Callable

from kafka import ConsumerRebalanceListener
from kafka.errors import ProducerFencedError
from kafka.structs import TopicPartition

from stream_worker.config import Config
from stream_worker.streaming.batch import BatchResult, Pipeline
from stream_worker.streaming.checkpoint import Checkpoint
from stream_worker.streaming.metrics import Metrics

log = logging.getLogger(__name__)

LAG_REFRESH_SECONDS = 5.0
RETRY_BACKOFF_SECONDS = 1.0
BUSY_POLL_INTERVAL_S = 1.0
"""While the engine works and no rebalance is in progress, the consumer is polled this often,
not back to back: a finished batch is then noticed at once instead of at the end of a poll, which
kafka-python sleeps through while partitions are paused (back-to-back polls cost the I/O path ~30%)."""


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


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        self.worker.on_revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.worker.on_assigned(assigned)


class Worker:
    def __init__(self, config: Config, pipeline: Pipeline, consumer, producer, metrics: Metrics,
                 broker_reachable: Callable[[], bool], engine: EngineThread | None = None) -> None:
        """``engine``: the thread the pipeline's engine was built on (a new one if not given)."""
        self.config = config
        self.pipeline = pipeline
        self.engine = engine or EngineThread()
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.checkpoint = Checkpoint(consumer, producer, exactly_once=config.kafka.delivery == "exactly_once")
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None
        self.pending: list = []
        self.busy = False
        self.rebalanced = threading.Event()
        self.rebalancing = False  # partitions revoked, new assignment not yet received
        self.broker_reachable = broker_reachable
        self.last_lag_refresh = 0.0
        self.assigned: set = set()

    # ------------------------------------------------------------------ lifecycle

    def ready(self) -> tuple[bool, str]:
        if not self.assigned:
            return False, "no partitions assigned"
        if not self.broker_reachable():
            return False, "broker unreachable"
        return True, "ready"

    def request_stop(self, *_signal_args) -> None:
        """SIGTERM/SIGINT: stop fetching; finish, publish and commit the batch in hand within the grace period."""
        if not self.stopping.is_set():
            log.info("stop requested: draining (grace %.0f s)", self.config.worker.shutdown_grace_seconds)
            self.stop_deadline = time.monotonic() + self.config.worker.shutdown_grace_seconds
            self.stopping.set()

    def run(self) -> int:
        """Subscribes, then runs the lifecycle batch after batch until SIGTERM: :meth:`collect` →
        :meth:`process` → :meth:`publish` → :meth:`commit`."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        for topic in self.config.kafka.input_topics:
            # Known partitions before the first join: a group leader without the topic's metadata
            # assigns nothing, and the rejoin that follows can stall the group.
            if not self.consumer.partitions_for_topic(topic):
                log.warning("input topic %s does not exist (yet); waiting for it to appear", topic)
        self.consumer.subscribe(self.config.kafka.input_topics, listener=_Rebalance(self))
        log.info("consuming %s as group %s (%s)", self.config.kafka.input_topics, self.config.kafka.group_id,
                 self.config.kafka.delivery)
        self.metrics.ready.set_function(lambda: int(self.ready()[0]))
        exit_code = 0
        try:
            while not self.stopping.is_set():
                messages = self.collect()
                if messages:  # also after a stop request: the batch in hand is drained
                    self.handle(messages)
                self._refresh_lag()
        except ProducerFencedError:
            log.error("another worker took over this transactional id; exiting")
            exit_code = 1
        finally:
            self._close()
        return exit_code

    def handle(self, messages: list) -> None:
        """One batch through process → publish → commit. A failure in publish or commit leaves
        the offsets uncommitted and rewinds, so the batch is processed again, never lost."""
        started = time.monotonic()
        result = self.process(messages)
        if result is None:
            return
        result = result.only_from(self.consumer.assignment())
        stage = "publish"
        try:
            self.publish(result)
            stage = "commit"
            self.commit()
        except ProducerFencedError:
            raise
        except Exception as exc:
            log.error("%s failed (%s: %s); the batch stays uncommitted and will be processed again",
                      stage, type(exc).__name__, exc)
            self.metrics.batch_failures.labels(stage=stage).inc()
            self.checkpoint.rewind()
            time.sleep(RETRY_BACKOFF_SECONDS)
            return
        self._count(result)
        elapsed = time.monotonic() - started
        self.metrics.batch_seconds.observe(elapsed)
        if elapsed > 0.5 * self.config.kafka.max_poll_interval_ms / 1000:
            log.warning("batch took %.1f s, over half of kafka.max_poll_interval_ms", elapsed)

    def _close(self) -> None:
        self.metrics.ready.set_function(lambda: 0)
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)
        log.info("stopped")

    # ------------------------------------------------------------------ collect

    def _poll(self, timeout_ms: int, max_records: int | None = None) -> None:
        """The one place records arrive: they join ``pending``; a rebalance is reconciled after
        they are, so the positions the checkpoint restores account for them."""
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        for messages in polled.values():
            for message in messages:
                self.pending.append(message)
                self.metrics.messages_consumed.labels(topic=message.topic).inc()
        if self.rebalanced.is_set():
            self._after_rebalance()
        self.metrics.in_flight.set(len(self.checkpoint) + len(self.pending))

    def collect(self) -> list:
        """Polls until the batch is full, or ``max_wait_seconds`` after its first message, or a
        stop is requested; returns the batch (possibly empty)."""
        batching = self.config.batching
        deadline = None
        while not self.stopping.is_set() and len(self.pending) < batching.max_spectra:
            timeout_ms = self.config.worker.poll_timeout_ms
            if deadline is not None:
                timeout_ms = max(0, min(timeout_ms, int((deadline - time.monotonic()) * 1000)))
            self._poll(timeout_ms, max_records=batching.max_spectra - len(self.pending))
            if self.pending and deadline is None:
                deadline = time.monotonic() + batching.max_wait_seconds
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not self.pending:
                self._refresh_lag()
        messages, self.pending = self.pending, []
        return messages

    # ------------------------------------------------------------------ process

    def process(self, messages: list) -> BatchResult | None:
        """Runs the batch on the engine thread while polling with every partition paused;
        ``None`` if the batch was abandoned (grace period over) or the engine failed on it.

        Polls are spaced ``BUSY_POLL_INTERVAL_S`` apart, except during a rebalance: from the
        revocation to the new assignment they follow back to back, and go on past the end of the
        batch. kafka-python 3.0.12 loses a group join whose answer arrives while no poll awaits it
        (the member then believes it joined but never takes its assignment and stops its
        heartbeats), so a join in flight must never be left between polls, and polls are never
        shorter than ``worker.poll_timeout_ms``: a join answered as a poll times out is lost too."""
        for message in messages:  # from here on these offsets are the batch's to commit
            self.checkpoint.consumed(message)
        self.metrics.batch_size.observe(len(messages))
        batch = self.engine.submit(self.pipeline.run, messages)
        self.busy = True
        self.consumer.pause(*self.consumer.assignment())
        rebalance_deadline = None
        try:
            while not batch.done() or self.rebalancing:
                if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                    log.warning("grace period over with a batch of %d in the engine: abandoning it uncommitted "
                                "(it will be redelivered)", len(messages))
                    return None
                if self.rebalancing:
                    if batch.done():  # bounded: by then the group has evicted a member stuck in a lost join
                        rebalance_deadline = rebalance_deadline or \
                            time.monotonic() + self.config.kafka.session_timeout_ms / 1000
                        if time.monotonic() > rebalance_deadline:
                            log.warning("rebalance still incomplete %.0f s after the batch; publishing it",
                                        self.config.kafka.session_timeout_ms / 1000)
                            break
                    self._poll(self.config.worker.poll_timeout_ms)
                else:
                    concurrent.futures.wait([batch], timeout=BUSY_POLL_INTERVAL_S)
                    if not batch.done():
                        self._poll(self.config.worker.poll_timeout_ms)
        finally:
            self.busy = False
            self.consumer.resume(*self.consumer.assignment())
        try:
            return batch.result()
        except Exception:
            log.exception("engine failed on a whole batch; it will be consumed again")
            self.metrics.batch_failures.labels(stage="engine").inc()
            self.checkpoint.rewind()
            time.sleep(RETRY_BACKOFF_SECONDS)
            return None

    # ------------------------------------------------------------------ publish, commit

    def publish(self, result: BatchResult) -> None:
        """Hands every result and dead letter of the batch to the producer (not yet acknowledged)."""
        for message in result.outgoing:
            self.checkpoint.publish(message.topic, message.key, message.value, message.headers)

    def commit(self) -> None:
        """Waits for every message to be acknowledged, then commits the batch's offsets
        (the checkpoint's numbered sequence)."""
        self.checkpoint.commit()

    def _count(self, result: BatchResult) -> None:
        now = time.time()
        records = result.records
        self.metrics.spectra_processed.inc(len(records))
        self.metrics.inference_seconds.observe(result.inference_seconds)
        self.metrics.count_published(records)
        for dead in result.dead_letters:
            self.metrics.dead_letters.labels(reason=dead.reason).inc()
        for record in records:
            if record.get("input_timestamp_ms"):
                self.metrics.latency.observe(max(0.0, now - record["input_timestamp_ms"] / 1000))
        self.metrics.last_success.set(now)
        self.metrics.in_flight.set(len(self.checkpoint) + len(self.pending))

    # ------------------------------------------------------------------ rebalance

    def on_revoked(self, revoked) -> None:
        """Runs on kafka-python's IO thread, which also drives heartbeats: it must not block,
        so it only takes note. The main thread reconciles after its next poll."""
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))
        self.assigned -= set(revoked)
        self.rebalancing = True
        self.rebalanced.set()

    def on_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self.assigned |= set(assigned)
        self.rebalancing = False
        self.rebalanced.set()

    def _after_rebalance(self) -> None:
        """Abandons the uncommitted work of partitions this worker lost (their new owner redoes
        it, and nothing of it is published or committed here) and keeps going where it was on
        the partitions it kept: the checkpoint decides the offsets."""
        self.rebalanced.clear()
        owned = self.consumer.assignment()
        self.pending = [m for m in self.pending if TopicPartition(m.topic, m.partition) in owned]
        self.checkpoint.reconcile(owned, self.pending)
        if self.busy:  # newly assigned partitions wait for the batch in the engine too
            self.consumer.pause(*owned)
        for metric in self.metrics.consumer_lag.collect():
            for sample in metric.samples:
                if TopicPartition(sample.labels["topic"], int(sample.labels["partition"])) not in owned:
                    self.metrics.consumer_lag.remove(sample.labels["topic"], sample.labels["partition"])
        self.last_lag_refresh = 0.0

    # ------------------------------------------------------------------ lag

    def _refresh_lag(self) -> None:
        """Lag per partition = end offset - position, every few seconds."""
        if time.monotonic() - self.last_lag_refresh < LAG_REFRESH_SECONDS or not self.assigned:
            return
        self.last_lag_refresh = time.monotonic()
        partitions = [tp for tp in self.consumer.assignment()]
        try:
            ends = self.consumer.end_offsets(partitions, timeout_ms=2000)
            for tp in partitions:
                position = self.consumer.position(tp, timeout_ms=2000)
                if position is not None and tp in ends:
                    self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                        max(0, ends[tp] - position))
        except Exception as exc:
            log.warning("cannot read partition end offsets for the lag: %s: %s", type(exc).__name__, exc)
