"""The sink's loop: poll a batch of result messages, store it in one database transaction, repeat.

Each turn (:meth:`Sink.step`):

1. poll up to ``sink.max_rows`` messages;
2. partitions assigned since the last turn start where the database says (``sink_offsets``), not
   where the consumer group says: the messages this poll brought for them are dropped and the
   consumer seeks to the stored offset;
3. messages the database already has (below a partition's stored offset) are skipped;
4. each message is checked and made a row (:class:`~stream_worker.sink.rows.RowReader`); one
   that is not a valid result becomes a dead letter;
5. one transaction: upsert the rows (a row the database refuses becomes a dead letter too),
   publish the dead letters and wait for the broker's acknowledgement, store the next offsets,
   commit. A crash anywhere before the commit leaves neither rows nor offsets, and the batch is
   consumed again; a crash after it finds both;
6. the same offsets are committed to the consumer group, only so that its lag (what KEDA and
   the dashboards read) is right.

A failed transaction (the database or the broker away) is rolled back, the consumer seeks back
to the batch's first messages, and the sink retries with a growing pause, not ready meanwhile.
Readiness and liveness also judge by the time since the last committed transaction while results
wait (:class:`~stream_worker.streaming.progress.Progress`, as for the worker): a transaction that
hangs (a database that accepts connections but no longer answers) or a broker that stops
answering turns the sink unready after ``sink.ready_stall_seconds`` and not live after
``sink.live_stall_seconds``, so that Kubernetes restarts what the sink cannot heal itself.
Rows are idempotent upserts keyed by ``spectrum_id``, so even two sinks briefly writing the same
partition during a rebalance store each record once. SIGTERM: the transaction under way
finishes, then the sink exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_worker.config import Config
from stream_worker.sink.metrics import SinkMetrics
from stream_worker.sink.rows import RejectedRecord, RowReader
from stream_worker.sink.store import ResultStore, StoreError
from stream_worker.streaming.checkpoint import BatchOffsets, PublishError
from stream_worker.streaming.kafka_clients import Rebalance, joining, member_ready, partition_lag
from stream_worker.streaming.metrics import forget_lag, show_lag
from stream_worker.streaming.outgoing import Outgoing, dead_letter_message, send
from stream_worker.streaming.progress import Progress, join_overdue

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 1000
LAG_REFRESH_SECONDS = 5.0
DEAD_LETTER_TIMEOUT_S = 60.0


class Sink:
    """The results topic into the database: poll, check, store a batch and its offsets in one
    transaction, retry from the same offsets when that fails."""

    def __init__(self, config: Config, reader: RowReader, store: ResultStore, consumer, producer,
                 metrics: SinkMetrics, broker_problem: Callable[[], str | None]) -> None:
        """``consumer`` reads the results topic in the sink's group; ``producer`` sends dead letters."""
        self.topic = config.sink.topic or config.kafka.output_topic
        self.dead_letter_topic = config.sink.dead_letter_topic or config.kafka.dead_letter_topic
        self.max_rows = config.sink.max_rows
        self.retry_max_seconds = config.sink.retry_max_seconds
        self.ready_stall_seconds = config.sink.ready_stall_seconds
        self.live_stall_seconds = config.sink.live_stall_seconds
        self.max_dead_letter_bytes = config.kafka.max_request_size - 65_536  # room for the dlq.* headers
        self.reader = reader
        self.store = store
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.broker_problem = broker_problem
        self.stored: dict[TopicPartition, int] = {}  # per owned partition: the next offset to store
        self.assigned: set[TopicPartition] = set()
        self.to_resume: set[TopicPartition] = set()  # assigned, not yet put at their stored offsets
        self.lock = threading.Lock()  # the rebalance callbacks may run on kafka-python's thread
        self.failures = 0  # consecutive failed transactions
        self.last_error: str | None = None
        self.last_lag_refresh = 0.0
        self.lag = 0  # results behind the owned partitions' ends, as last read from the broker
        self.progress = Progress()
        self.joining_since: float | None = None  # when the group join under way began (None: none is)
        self.stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def ready(self) -> tuple[bool, str]:
        """/readyz: the last transaction succeeded, partitions assigned, a broker usable, and a
        transaction committed within ``sink.ready_stall_seconds`` while results wait."""
        if self.last_error is not None:
            return False, f"storing failed: {self.last_error}"
        ok, why = member_ready(self.assigned, self.broker_problem)
        if not ok:
            return ok, why
        stalled = self.progress.stalled(self.ready_stall_seconds, "sink.ready_stall_seconds")
        return (False, stalled) if stalled else (True, "ready")

    def live(self) -> tuple[bool, str]:
        """/healthz: fails once results have waited ``sink.live_stall_seconds`` without a
        committed transaction (a hung database call, a broker that stopped answering, failures
        that do not end), or a group join has lasted that long (kafka-python 3.0.12 can lose one:
        the member then waits for partitions for good, with no lag of its own to show it
        stalled); waiting for the database at start-up does not count."""
        bound, setting = self.live_stall_seconds, "sink.live_stall_seconds"
        why = self.progress.stalled(bound, setting) or join_overdue(self.joining_since, bound, setting)
        return (False, why) if why else (True, "ok")

    def request_stop(self, *_signal_args) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: finishing the transaction under way")
            self.stopping.set()

    def run(self) -> int:
        """Opens the database (migrating its tables), subscribes, stores until SIGTERM."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            self._open_database()
        except StoreError as exc:
            log.error("%s", exc)
            return 2
        if self.stopping.is_set():
            return 0
        # Known partitions before the first join: a group leader without the topic's metadata
        # assigns nothing, and the rejoin that follows can stall the group (as for the worker).
        if not self.consumer.partitions_for_topic(self.topic):
            log.warning("results topic %s does not exist (yet); waiting for it to appear", self.topic)
        self.consumer.subscribe([self.topic], listener=Rebalance(self))
        log.info("storing %s into schema %s as group %s", self.topic, self.store.db_schema, self.store.group_id)
        self.metrics.ready.set_function(lambda: int(self.ready()[0]))
        self.metrics.stalled.set_function(self.progress.stalled_seconds)
        try:
            while not self.stopping.is_set():
                self.step()
        finally:
            self._close()
        return 0

    def _open_database(self) -> None:
        """Until the database answers (at start it may be coming up too) or a stop request."""
        while not self.stopping.is_set():
            try:
                self.store.open()
                self.last_error = None
                return
            except StoreError:
                raise
            except Exception as exc:
                self._note_failure(exc, "opening the database")

    def _close(self) -> None:
        self.metrics.ready.set_function(lambda: 0)
        if self.stored:
            try:  # the group's offsets only show the lag; the database's are the truth
                self.consumer.commit(_group_offsets(self.stored), timeout_ms=5000)
            except Exception as exc:
                log.warning("cannot commit the final offsets to the group: %s: %s", type(exc).__name__, exc)
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)
        self.store.close()
        log.info("stopped")

    # ------------------------------------------------------------------ one turn

    def step(self) -> None:
        polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=self.max_rows)
        self._note_join()
        messages = [message for batch in polled.values() for message in batch]
        for message in messages:
            self.metrics.records_consumed.labels(topic=message.topic).inc()
        messages = self._resume(messages)
        fresh = [m for m in messages if m.offset >= self.stored.get(TopicPartition(m.topic, m.partition), 0)]
        self.progress.note(self.lag + len(fresh))  # noted before storing: a transaction that hangs stalls
        if fresh:
            self._store(fresh)
        self._refresh_lag()
        self.progress.note(self.lag)

    def _resume(self, messages: list) -> list:
        """Puts newly assigned partitions at the offsets stored in the database; returns the
        messages to store (none of a partition it moved)."""
        with self.lock:
            new, self.to_resume = self.to_resume & self.assigned, set()
        if not new:
            return messages
        try:
            stored = self.store.offsets(self.topic)
        except Exception as exc:
            with self.lock:
                self.to_resume |= new
            self._seek_back(_first_offsets([m for m in messages if _partition(m) in new]))
            self.progress.failed()
            self._note_failure(exc, "reading the stored offsets")
            return [m for m in messages if _partition(m) not in new]
        moved = set()
        for tp in sorted(new):
            if tp in stored:
                log.info("resuming %s[%d] from the database at offset %d", tp.topic, tp.partition, stored[tp])
                self.consumer.seek(tp, stored[tp])
                self.stored[tp] = stored[tp]
                moved.add(tp)
            else:
                log.info("%s[%d] has nothing stored yet: starting at the group's position", tp.topic, tp.partition)
        return [m for m in messages if _partition(m) not in moved]

    def _store(self, messages: list) -> None:
        offsets = BatchOffsets()
        rows, dead_letters = {}, []
        for message in messages:
            offsets.add(message)
        started = time.perf_counter()
        try:  # a decode that needs an absent schema registry fails like the database: retried
            for message in messages:
                try:
                    rows[(message.partition, message.offset)] = (message, self.reader.row(message))
                except RejectedRecord as exc:
                    dead_letters.append(self._dead_letter(message, exc.reason, str(exc)))
            with self.store.transaction() as transaction:
                refused = transaction.upsert([row for _, row in rows.values()])
                for row, text in refused:
                    message, _ = rows.pop((row.values[-2], row.values[-1]))
                    dead_letters.append(self._dead_letter(message, "database_rejected", text))
                self._publish(dead_letters)
                transaction.advance(offsets.next)
        except Exception as exc:
            self._seek_back(offsets.first)
            self.progress.failed()
            self._note_failure(exc, f"storing {len(messages)} records")
            return
        now = time.time()
        self.metrics.transaction_seconds.observe(time.perf_counter() - started)
        self.metrics.transaction_rows.observe(len(rows))
        self.metrics.rows_written.inc(len(rows))
        for outgoing in dead_letters:
            self.metrics.dead_letters.labels(reason=dict(outgoing.headers)["dlq.reason"].decode()).inc()
        self.metrics.last_success.set(now)
        self.stored.update(offsets.next)
        self.failures, self.last_error = 0, None
        self.progress.committed()
        try:
            self.consumer.commit_async(_group_offsets(offsets.next))
        except Exception as exc:  # a rebalance under way: the next batch's commit covers this one
            log.debug("group commit skipped: %s", exc)

    def _dead_letter(self, message, reason: str, text: str) -> Outgoing:
        return dead_letter_message(message, reason, text, self.dead_letter_topic, self.max_dead_letter_bytes)

    def _publish(self, dead_letters: list[Outgoing]) -> None:
        """Sends the dead letters and waits until the broker has them all (inside the transaction:
        its offsets pass these messages only once their dead letters are safe)."""
        if not dead_letters:
            return
        futures = send(self.producer, dead_letters)
        self.producer.flush(timeout=DEAD_LETTER_TIMEOUT_S)
        failed = [f.exception for f in futures if not f.succeeded()]
        if failed:
            raise PublishError(f"{len(failed)} of {len(futures)} dead letters not acknowledged: {failed[0]!r}")

    def _seek_back(self, first: dict[TopicPartition, int]) -> None:
        """The messages from ``first`` on were not stored: consume them again."""
        for tp, offset in first.items():
            if tp in self.assigned:
                self.consumer.seek(tp, offset)

    def _note_failure(self, exc: Exception, doing: str) -> None:
        """Logs and counts a failure, and waits before the retry (1, 2, 4 ... s, at most
        ``sink.retry_max_seconds``; a stop request ends the wait)."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}".strip()
        self.metrics.transaction_failures.inc()
        pause = min(self.retry_max_seconds, 2.0 ** (self.failures - 1))
        log.error("%s failed (%s); nothing of it is stored: retrying in %.0f s", doing, self.last_error, pause)
        self.stopping.wait(pause)

    # ------------------------------------------------------------------ rebalance and lag

    def on_revoked(self, revoked) -> None:
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))
        with self.lock:
            self.assigned -= set(revoked)
            for tp in revoked:
                self.stored.pop(tp, None)

    def on_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        with self.lock:
            self.assigned |= set(assigned)
            self.to_resume |= set(assigned)
        self.last_lag_refresh = 0.0
        self.progress.reassigned()  # failed work of partitions now elsewhere is their new owner's

    def _note_join(self) -> None:
        """The member's state after each poll tells a join under way, eager or cooperative."""
        if not joining(self.consumer):
            self.joining_since = None
        elif self.joining_since is None:
            self.joining_since = time.monotonic()

    def _refresh_lag(self) -> None:
        """Every ``LAG_REFRESH_SECONDS``: the owned partitions' lag, for the gauge and the stall
        clock (a broker that does not answer leaves the last value)."""
        if not self.assigned:
            self.lag = 0
            return
        if time.monotonic() - self.last_lag_refresh < LAG_REFRESH_SECONDS:
            return
        self.last_lag_refresh = time.monotonic()
        forget_lag(self.metrics.consumer_lag, self.assigned)
        try:
            lag = partition_lag(self.consumer)
        except Exception as exc:
            log.warning("cannot read partition end offsets for the lag: %s: %s", type(exc).__name__, exc)
            return
        self.lag = sum(lag.values())
        show_lag(self.metrics.consumer_lag, lag)


def _partition(message) -> TopicPartition:
    return TopicPartition(message.topic, message.partition)


def _first_offsets(messages: list) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for message in messages:
        first.setdefault(_partition(message), message.offset)
    return first


def _group_offsets(offsets: dict[TopicPartition, int]) -> dict:
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
