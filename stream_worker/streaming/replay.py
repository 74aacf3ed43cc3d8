"""``stream-worker replay``: the worker over a time range of the input topic, under its own
consumer group, stopping at the range's end (reprocessing after new weights, say).

The range is fixed once, as offsets: per partition, the first message at or after ``--from``
(``offsets_for_times``) up to the first at or after ``--to`` (or the end of the partition when
the replay starts). The start offsets are committed to the replay's group before the worker
joins it, so the worker begins there with its ordinary machinery (delivery guarantees included);
a replay interrupted and run again with the same group resumes from what it committed. Results
carry the header ``replay: <group>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kafka.structs import OffsetAndMetadata, TopicPartition

REPLAY_HEADER = "replay"


@dataclass
class ReplayRange:
    """Per partition, the offsets the replay covers, ``[start, end)``, and how far it has committed."""

    start: dict[TopicPartition, int]
    end: dict[TopicPartition, int]
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    spectra: int = 0
    dead_letters: int = 0
    progress: Callable[[ReplayRange], None] | None = None  # called after each committed batch

    def __post_init__(self) -> None:
        self.committed = {tp: max(self.committed.get(tp, 0), self.start[tp]) for tp in self.start}

    def beyond(self, message) -> bool:
        """Past the range's end (or of a partition that did not exist when the range was fixed)."""
        return message.offset >= self.end.get(TopicPartition(message.topic, message.partition), 0)

    def record(self, next_offsets: dict[TopicPartition, int], spectra: int, dead_letters: int) -> None:
        """A batch was committed: ``next_offsets`` per partition, with so many results and dead letters."""
        for tp, offset in next_offsets.items():
            self.committed[tp] = max(self.committed.get(tp, 0), offset)
        self.spectra += spectra
        self.dead_letters += dead_letters
        if self.progress is not None:
            self.progress(self)

    def done(self) -> bool:
        return all(self.committed[tp] >= end for tp, end in self.end.items())

    @property
    def total(self) -> int:
        """Messages in the range."""
        return sum(max(0, self.end[tp] - self.start[tp]) for tp in self.end)

    @property
    def covered(self) -> int:
        """Messages of the range committed so far."""
        return sum(max(0, min(self.committed[tp], self.end[tp]) - self.start[tp]) for tp in self.end)


def plan_range(consumer, topics: list[str], from_ms: int, to_ms: int | None) -> ReplayRange:
    """The range's offsets, and where the replay's group (``consumer``'s) already is within it;
    commits the start offsets of partitions the group has not committed yet."""
    partitions = [TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not partitions:
        raise ValueError(f"input topics {topics} do not exist")
    latest = consumer.end_offsets(partitions)

    def offsets_at(ms: int | None) -> dict[TopicPartition, int]:
        if ms is None:
            return dict(latest)
        found = consumer.offsets_for_times({tp: ms for tp in partitions})
        return {tp: found[tp].offset if found.get(tp) is not None else latest[tp] for tp in partitions}

    start, end = offsets_at(from_ms), offsets_at(to_ms)
    committed = {tp: offset for tp in partitions if (offset := consumer.committed(tp)) is not None}
    fresh = {tp: OffsetAndMetadata(start[tp], "", -1) for tp in partitions if tp not in committed}
    if fresh:
        consumer.commit(fresh)
    return ReplayRange(start, end, committed)
