"""The streaming worker: consume → (decode → validate → infer → build records) → publish → commit.

The main thread owns the Kafka consumer. It collects a micro-batch (``batching.max_spectra``
messages, or whatever arrived within ``batching.max_wait_seconds`` of the first), hands it to
the engine thread, and while the engine works it keeps polling with every partition *paused*:
no more data is fetched (backpressure), yet the member stays in its group however slow the
batch (a slow batch cannot make the group thrash), rebalances are served, and SIGTERM is seen.
Results and dead letters are then published and the offsets committed by the
:class:`~stream_worker.checkpoint.Checkpoint`. When partitions are revoked, the batch in hand
is finished and committed first, so nothing is committed that was not published.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time

from kafka import ConsumerRebalanceListener
from kafka.errors import ProducerFencedError

from .checkpoint import Checkpoint
from .config import Config
from .metrics import HealthServer, Metrics
from .pipeline import BatchResult, FileReader, Pipeline

log = logging.getLogger(__name__)

LAG_REFRESH_SECONDS = 5.0
RETRY_BACKOFF_SECONDS = 1.0


def _in_thread(function, *args) -> concurrent.futures.Future:
    """Runs ``function`` on a daemon thread: an engine batch abandoned at shutdown must not
    keep the process alive."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # handed to the main thread, which decides
            future.set_exception(exc)

    threading.Thread(target=target, name="engine", daemon=True).start()
    return future


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        self.worker.on_revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.worker.on_assigned(assigned)


class Worker:
    def __init__(self, config: Config, pipeline: Pipeline, consumer, producer, metrics: Metrics) -> None:
        self.config = config
        self.pipeline = pipeline
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.checkpoint = Checkpoint(consumer, producer, exactly_once=config.kafka.delivery == "exactly_once")
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None
        self.pending: list = []
        self.in_flight: concurrent.futures.Future | None = None
        self.broker_reachable = True
        self.last_lag_refresh = 0.0
        self.assigned: set = set()

    # ------------------------------------------------------------------ lifecycle

    def ready(self) -> tuple[bool, str]:
        if not self.assigned:
            return False, "no partitions assigned"
        if not self.broker_reachable:
            return False, "broker unreachable"
        return True, "ready"

    def request_stop(self, *_signal_args) -> None:
        """SIGTERM/SIGINT: stop fetching; finish, publish and commit the batch in hand within the grace period."""
        if not self.stopping.is_set():
            log.info("stop requested: draining (grace %.0f s)", self.config.worker.shutdown_grace_seconds)
            self.stop_deadline = time.monotonic() + self.config.worker.shutdown_grace_seconds
            self.stopping.set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.consumer.subscribe(self.config.kafka.input_topics, listener=_Rebalance(self))
        log.info("consuming %s as group %s (%s)", self.config.kafka.input_topics, self.config.kafka.group_id,
                 self.config.kafka.delivery)
        exit_code = 0
        try:
            while not self.stopping.is_set():
                self._collect()
                if self.pending:
                    self._process()
                self._refresh_lag()
        except ProducerFencedError:
            log.error("another worker took over this transactional id; exiting")
            exit_code = 1
        finally:
            self._close()
        return exit_code

    def _close(self) -> None:
        self.metrics.ready.set(0)
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)
        log.info("stopped")

    # ------------------------------------------------------------------ consume

    def _collect(self) -> None:
        """Polls until the batch is full, or ``max_wait_seconds`` after its first message."""
        batching = self.config.batching
        deadline = None
        while not self.stopping.is_set() and len(self.pending) < batching.max_spectra:
            timeout_ms = self.config.worker.poll_timeout_ms
            if deadline is not None:
                timeout_ms = max(0, min(timeout_ms, int((deadline - time.monotonic()) * 1000)))
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=batching.max_spectra - len(self.pending))
            for messages in polled.values():
                for message in messages:
                    self.pending.append(message)
                    self.checkpoint.consumed(message)
                    self.metrics.messages_consumed.labels(topic=message.topic).inc()
            self.metrics.in_flight.set(len(self.checkpoint))
            if self.pending and deadline is None:
                deadline = time.monotonic() + batching.max_wait_seconds
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not self.pending:
                self._refresh_lag()

    # ------------------------------------------------------------------ process

    def _process(self) -> None:
        """Runs the batch on the engine thread while polling with every partition paused."""
        started = time.monotonic()
        messages, self.pending = self.pending, []
        self.metrics.batch_size.observe(len(messages))
        self.in_flight = _in_thread(self.pipeline.run, messages)
        paused = self.consumer.assignment()
        self.consumer.pause(*paused)
        try:
            while self.in_flight is not None and not self.in_flight.done():
                if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                    log.warning("grace period over with a batch of %d in the engine: abandoning it uncommitted "
                                "(it will be redelivered)", len(messages))
                    self.in_flight = None
                    return
                self.consumer.poll(timeout_ms=self.config.worker.poll_timeout_ms)
        finally:
            still_assigned = self.consumer.assignment()
            self.consumer.resume(*[tp for tp in paused if tp in still_assigned])
        if self.in_flight is not None:  # not already finished by a rebalance
            self._finish_in_flight()
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        slow = time.monotonic() - started
        if slow > 0.5 * self.config.kafka.max_poll_interval_ms / 1000:
            log.warning("batch took %.1f s, over half of kafka.max_poll_interval_ms", slow)

    def _finish_in_flight(self) -> None:
        future, self.in_flight = self.in_flight, None
        try:
            result = future.result()
        except Exception:
            log.exception("engine failed on a whole batch; it will be consumed again")
            self.metrics.batch_failures.labels(stage="engine").inc()
            self.checkpoint.rewind()
            time.sleep(RETRY_BACKOFF_SECONDS)
            return
        self._publish_and_commit(result)

    def _publish_and_commit(self, result: BatchResult) -> None:
        stage = "publish"
        try:
            for message in result.outgoing:
                self.checkpoint.publish(message.topic, message.key, message.value, message.headers)
            stage = "commit"
            self.checkpoint.commit()
        except ProducerFencedError:
            raise
        except Exception as exc:
            log.error("%s failed (%s: %s); the batch stays uncommitted and will be processed again",
                      stage, type(exc).__name__, exc)
            self.metrics.batch_failures.labels(stage=stage).inc()
            self.broker_reachable = False
            self.checkpoint.rewind()
            time.sleep(RETRY_BACKOFF_SECONDS)
            return
        self.broker_reachable = True
        self._count(result)

    def _count(self, result: BatchResult) -> None:
        now = time.time()
        self.metrics.spectra_processed.inc(result.spectra)
        self.metrics.inference_seconds.observe(result.inference_seconds)
        self.metrics.count_published(result.records)
        for dead in result.dead_letters:
            self.metrics.dead_letters.labels(reason=dead.reason).inc()
        for record in result.records:
            if record.get("input_timestamp_ms"):
                self.metrics.latency.observe(max(0.0, now - record["input_timestamp_ms"] / 1000))
        self.metrics.last_success.set(now)
        self.metrics.in_flight.set(len(self.checkpoint))

    # ------------------------------------------------------------------ rebalance

    def on_revoked(self, revoked) -> None:
        """Finish what was consumed before the partitions move, so the next owner starts after it."""
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))
        if self.in_flight is not None:
            self._finish_in_flight()
        elif self.pending:
            messages, self.pending = self.pending, []
            self.in_flight = _in_thread(self.pipeline.run, messages)
            self._finish_in_flight()
        self.assigned -= set(revoked)
        for tp in revoked:
            self.metrics.consumer_lag.remove(tp.topic, str(tp.partition)) if self._has_lag(tp) else None
        self.metrics.ready.set(int(self.ready()[0]))

    def on_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self.assigned |= set(assigned)
        self.last_lag_refresh = 0.0
        self.metrics.ready.set(int(self.ready()[0]))

    def _has_lag(self, tp) -> bool:
        return (tp.topic, str(tp.partition)) in {
            (s.labels["topic"], s.labels["partition"])
            for metric in self.metrics.consumer_lag.collect() for s in metric.samples
        }

    # ------------------------------------------------------------------ lag

    def _refresh_lag(self) -> None:
        """Lag per partition = end offset - position; a failed lookup marks the broker unreachable."""
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
            self.broker_reachable = True
        except Exception as exc:
            if self.broker_reachable:
                log.warning("cannot reach the broker for offsets: %s: %s", type(exc).__name__, exc)
            self.broker_reachable = False
        self.metrics.ready.set(int(self.ready()[0]))


def build_worker(config: Config) -> tuple[Worker, HealthServer | None]:
    """Everything ``stream-worker run`` needs, wired from the config (the I/O edges live here)."""
    from .inference import Estimator
    from .kafka_io import make_consumer, make_producer

    metrics = Metrics()
    estimator = Estimator.from_config(config.engine)
    metrics.set_model(estimator.weights_info, str(estimator.device), estimator.num_draws)
    pipeline = Pipeline(
        estimator, FileReader(config.inputs.data_roots), config.kafka.output_topic, config.kafka.dead_letter_topic,
        config.inputs.max_message_bytes,
    )
    worker = Worker(config, pipeline, make_consumer(config), make_producer(config), metrics)
    health = None
    if config.metrics.enabled:
        health = HealthServer(metrics, worker.ready, config.metrics.host, config.metrics.port).start()
    return worker, health
