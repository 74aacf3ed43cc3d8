"""Delivery semantics in one object: publish a batch's messages, then commit its offsets.

``commit()`` is a short numbered sequence:

1. flush the producer;
2. fail loudly if any message of the batch was not acknowledged (``acks=all``);
3. commit the consumed offsets — with the consumer (at-least-once) or inside the producer's
   transaction, together with the published messages (exactly-once).

At-least-once and exactly-once differ in one ``if``, here. Nothing else in the worker touches
offsets: a failure leaves them uncommitted and ``rewind()`` puts the consumer back on the first
unprocessed message, so the batch is processed again rather than lost; after a rebalance
``reconcile()`` drops lost partitions and restores the positions of kept ones.
"""

from __future__ import annotations

import logging

from kafka.structs import OffsetAndMetadata, TopicPartition

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """A message of the batch was not acknowledged by the broker; the offsets were not committed."""


class Checkpoint:
    def __init__(self, consumer, producer, exactly_once: bool, flush_timeout_s: float = 60.0) -> None:
        self.consumer = consumer
        self.producer = producer
        self.exactly_once = exactly_once
        self.flush_timeout_s = flush_timeout_s
        self.first_offsets: dict[TopicPartition, int] = {}
        self.next_offsets: dict[TopicPartition, int] = {}
        self.futures: list = []
        self.in_transaction = False

    def __len__(self) -> int:
        """Messages consumed and not yet committed."""
        return sum(self.next_offsets[tp] - self.first_offsets[tp] for tp in self.next_offsets)

    def consumed(self, message) -> None:
        tp = TopicPartition(message.topic, message.partition)
        self.first_offsets.setdefault(tp, message.offset)
        self.next_offsets[tp] = message.offset + 1

    def publish(self, topic: str, key: bytes | None, value: bytes, headers: list) -> None:
        if self.exactly_once and not self.in_transaction:
            self.producer.begin_transaction()
            self.in_transaction = True
        self.futures.append(self.producer.send(topic, value=value, key=key, headers=headers))

    def commit(self) -> None:
        if not self.next_offsets:
            return
        # 1. flush
        self.producer.flush(timeout=self.flush_timeout_s)
        # 2. everything acknowledged?
        failed = [f.exception for f in self.futures if not f.succeeded()]
        if failed:
            raise PublishError(f"{len(failed)} of {len(self.futures)} messages not acknowledged: {failed[0]!r}")
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self.next_offsets.items()}
        # 3. commit the offsets
        if self.exactly_once:
            if not self.in_transaction:
                self.producer.begin_transaction()
                self.in_transaction = True
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
            self.in_transaction = False
        else:
            self.consumer.commit(offsets, timeout_ms=int(self.flush_timeout_s * 1000))
        log.debug("committed %s", {f"{tp.topic}[{tp.partition}]": o for tp, o in self.next_offsets.items()})
        self._clear()

    def reconcile(self, owned, held: list) -> None:
        """After a rebalance: forgets the uncommitted offsets of partitions no longer ``owned``
        (their new owner redoes that work) and puts the consumer of every kept partition just
        past the last message this worker still ``held`` (in the batch or collected for the next),
        since a rebalance resets fetch positions to the last commit."""
        for tp in [tp for tp in self.next_offsets if tp not in owned]:
            del self.next_offsets[tp], self.first_offsets[tp]
        positions = dict(self.next_offsets)
        for message in held:
            tp = TopicPartition(message.topic, message.partition)
            positions[tp] = max(positions.get(tp, 0), message.offset + 1)
        for tp, offset in positions.items():
            self.consumer.seek(tp, offset)

    def rewind(self) -> None:
        """Gives up the uncommitted batch: aborts the transaction (exactly-once) and seeks back,
        so the same messages are consumed again."""
        if self.exactly_once and self.in_transaction:
            try:
                self.producer.abort_transaction()
            except Exception:
                log.exception("aborting the transaction failed")
            self.in_transaction = False
        assigned = self.consumer.assignment()
        for tp, offset in self.first_offsets.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self._clear()

    def _clear(self) -> None:
        self.first_offsets.clear()
        self.next_offsets.clear()
        self.futures.clear()
