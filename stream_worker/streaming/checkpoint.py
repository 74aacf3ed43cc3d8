"""Delivery semantics in one object: publish each batch's messages, then commit its offsets, batch
after batch in the order they were consumed.

Several batches may be open at once (consumed, not yet committed: one in the engine, one being
published...). Each is a :class:`BatchOffsets`; they are committed strictly oldest first, and
:meth:`Checkpoint.commit` of a batch is a short numbered sequence:

1. make sure every message of the batch was acknowledged (``acks=all``), else fail loudly;
2. commit the batch's offsets — with the consumer (at-least-once) or inside the producer's
   transaction, together with the published messages (exactly-once).

At-least-once and exactly-once differ in a few ``if``s, here. Nothing else in the worker touches
offsets: a failure leaves them uncommitted and :meth:`Checkpoint.rewind` puts the consumer back
on the first uncommitted message, so every open batch is processed again rather than lost; after
a rebalance :meth:`Checkpoint.reconcile` drops lost partitions and restores the positions of kept
ones.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from kafka.errors import KafkaTimeoutError, ProducerFencedError
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_worker.streaming.outgoing import send

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """A message of the batch was not acknowledged by the broker; the offsets were not committed."""


class ProducerUnusable(RuntimeError):
    """The transactional producer can neither begin nor abort a transaction: kafka-python keeps
    it in that error state for good, so only a new producer can go on."""


@dataclass
class BatchOffsets:
    """The offsets one batch consumed: per partition, its first and one past its last."""

    first: dict[TopicPartition, int] = field(default_factory=dict)
    next: dict[TopicPartition, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(self.next[tp] - self.first[tp] for tp in self.next)

    def add(self, message) -> None:
        tp = TopicPartition(message.topic, message.partition)
        self.first.setdefault(tp, message.offset)
        self.next[tp] = message.offset + 1

    def keep_only(self, owned) -> None:
        for tp in [tp for tp in self.next if tp not in owned]:
            del self.next[tp], self.first[tp]


class Checkpoint:
    def __init__(self, consumer, producer, exactly_once: bool, flush_timeout_s: float) -> None:
        """``flush_timeout_s``: how long a commit waits for the batch's acknowledgements (and, at
        least once, for the offset commit) before it fails and the batch is redone."""
        self.consumer = consumer
        self.producer = producer
        self.exactly_once = exactly_once
        self.flush_timeout_s = flush_timeout_s
        self.open: deque[BatchOffsets] = deque()
        self.in_transaction = False
        self.unusable: str | None = None  # why the producer must be replaced (exactly-once)

    def __len__(self) -> int:
        """Messages consumed and not yet committed."""
        return sum(len(batch) for batch in self.open)

    def consumed(self, messages: list) -> BatchOffsets:
        """Opens a batch of ``messages`` (consumed after every open one): from here on their
        offsets are its to commit."""
        batch = BatchOffsets()
        for message in messages:
            batch.add(message)
        self.open.append(batch)
        return batch

    def publish(self, outgoing: list, on_acknowledged: Callable[[], None] | None = None) -> list:
        """Hands a batch's messages to the producer; returns their futures (not yet acknowledged).
        Exactly-once: inside a new transaction, which only :meth:`commit` or :meth:`rewind` ends,
        so one batch's transaction is committed before the next one's begins."""
        if self.exactly_once:
            if self.in_transaction:
                raise RuntimeError("a transaction is open: commit the previous batch first")
            self._begin_transaction()
        futures = send(self.producer, outgoing)
        if on_acknowledged is not None:
            for future in futures:
                future.add_both(lambda _: on_acknowledged())
        return futures

    @staticmethod
    def acknowledged(futures: list) -> bool:
        """Whether the broker has answered for every message (successfully or not)."""
        return all(future.is_done for future in futures)

    def commit(self, batch: BatchOffsets, futures: list) -> None:
        """Commits the oldest open ``batch``, whose messages ``futures`` are."""
        if not self.open or batch is not self.open[0]:
            raise RuntimeError("batches are committed in the order they were consumed")
        # 1. everything acknowledged? (exactly-once: the transaction's commit flushes too)
        if not self.acknowledged(futures):
            self.producer.flush(timeout=self.flush_timeout_s)
        failed = [f.exception for f in futures if not f.succeeded()]
        if failed:
            raise PublishError(f"{len(failed)} of {len(futures)} messages not acknowledged: {failed[0]!r}")
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in batch.next.items()}
        # 2. commit the offsets
        if self.exactly_once:
            if not self.in_transaction:  # a batch without anything to publish
                self._begin_transaction()
            if offsets:
                self._transactional("send_offsets_to_transaction", offsets, self.consumer.group_metadata())
            self._transactional("commit_transaction")
            self.in_transaction = False
        elif offsets:
            self.consumer.commit(offsets, timeout_ms=int(self.flush_timeout_s * 1000))
        log.debug("committed %s", {f"{tp.topic}[{tp.partition}]": o for tp, o in batch.next.items()})
        self.open.popleft()

    def _transactional(self, call: str, *args) -> None:
        """``producer.<call>(*args)``, a transactional request to the coordinator, waiting at most
        ``flush_timeout_s`` for its answer. kafka-python's own methods wait without a bound, and a
        producer that lost its coordinator in a failover may never get one: a worker sat blocked
        in one for over five minutes, neither polling nor committing. A time-out then fails the
        batch like any other failure (the abort that follows cannot succeed, so the producer is
        replaced). A producer without kafka-python's transaction manager (a test's) is called as is."""
        manager = getattr(self.producer, "_transaction_manager", None)
        if manager is None:
            getattr(self.producer, call)(*args)
            return
        begin = {"commit_transaction": "begin_commit", "abort_transaction": "begin_abort"}.get(call, call)
        result = getattr(manager, begin)(*args)
        self.producer._sender.wakeup()
        if not result.wait(timeout_ms=int(self.flush_timeout_s * 1000)):
            raise KafkaTimeoutError(f"{call}: no answer from the transaction coordinator within {self.flush_timeout_s:g} s")

    def _begin_transaction(self) -> None:
        try:
            self.producer.begin_transaction()
        except ProducerFencedError:
            raise
        except Exception as exc:
            self.unusable = f"cannot begin a transaction: {type(exc).__name__}: {exc}"
            raise ProducerUnusable(self.unusable) from exc
        self.in_transaction = True

    def replace_producer(self, producer) -> None:
        """A new producer (same transactional id) takes over; nothing is open any more."""
        self.producer, self.in_transaction, self.unusable = producer, False, None

    def reconcile(self, owned, held: list) -> None:
        """After a rebalance: forgets the uncommitted offsets of partitions no longer ``owned``
        (their new owner redoes that work) and puts the consumer of every kept partition just
        past the last message this worker still holds (in an open batch, or ``held`` for the
        next one), since a rebalance resets fetch positions to the last commit."""
        positions: dict[TopicPartition, int] = {}
        for batch in self.open:
            batch.keep_only(owned)
            positions.update(batch.next)
        for message in held:
            tp = TopicPartition(message.topic, message.partition)
            positions[tp] = max(positions.get(tp, 0), message.offset + 1)
        for tp, offset in positions.items():
            self.consumer.seek(tp, offset)

    def rewind(self, held: list = ()) -> dict[TopicPartition, int]:
        """Gives up every open batch (and the messages ``held`` for the next): aborts the
        transaction (exactly-once) and seeks each partition back to its first uncommitted
        message, so the same messages are consumed again. Returns those offsets."""
        if self.exactly_once and self.in_transaction:
            try:
                self._transactional("abort_transaction")
            except ProducerFencedError:
                raise
            except Exception as exc:
                log.error("aborting the transaction failed: %s: %s", type(exc).__name__, exc)
                self.unusable = f"aborting the transaction failed: {type(exc).__name__}: {exc}"
            self.in_transaction = False
        first: dict[TopicPartition, int] = {}
        for batch in self.open:  # oldest first: the first offset seen of a partition is its earliest
            for tp, offset in batch.first.items():
                first.setdefault(tp, offset)
        for message in held:
            first.setdefault(TopicPartition(message.topic, message.partition), message.offset)
        assigned = self.consumer.assignment()
        first = {tp: offset for tp, offset in first.items() if tp in assigned}
        for tp, offset in first.items():
            self.consumer.seek(tp, offset)
        self.open.clear()
        return first
