"""The dead-letter topic for operators: what is in it (``stream-worker deadletters``) and sending
chosen dead letters back to where they came from once their cause is fixed (``stream-worker
redrive``).

A re-driven message is the original, unchanged: key, value and headers without the ``dlq.*``
ones, plus ``redrive.count`` (how often it has been re-driven). The worker keeps non-``dlq``
headers on a dead letter, so a message that fails again carries its count, and ``redrive``
refuses it once the count reaches ``--max-redrives``: a message can never loop.

Re-driving is idempotent per consumer group (``--group``): the group's committed offsets on the
dead-letter topic are where the next run starts, committed only after every message sent was
acknowledged. Dead letters a run passes over (another reason, too many re-drives) are not
reconsidered by that group; another group starts from the beginning (or ``--since``) again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_worker.streaming.outgoing import Outgoing, send

REDRIVE_COUNT = "redrive.count"


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter topic, its ``dlq.*`` headers read."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    reason: str
    message: str
    source_topic: str
    source: str  # topic[partition]@offset of the rejected input
    failed_at: str
    redrives: int

    @classmethod
    def of(cls, consumed) -> DeadLetter:
        """From a consumed message; one without ``dlq.reason`` is reported as reason ``unknown``."""
        headers = list(consumed.headers or [])
        meta = {k: v.decode("utf-8", "replace") for k, v in headers if k.startswith("dlq.") or k == REDRIVE_COUNT}
        try:
            redrives = int(meta.get(REDRIVE_COUNT, "0"))
        except ValueError:
            redrives = 0
        topic = meta.get("dlq.source.topic", "")
        return cls(consumed.key, consumed.value or b"", headers, meta.get("dlq.reason", "unknown"),
                   meta.get("dlq.message", ""), topic,
                   f"{topic}[{meta.get('dlq.source.partition', '?')}]@{meta.get('dlq.source.offset', '?')}",
                   meta.get("dlq.failed_at", ""), redrives)

    def redriven(self, topic: str | None = None) -> Outgoing:
        """The original message again, for ``topic`` (default: where it was consumed from)."""
        kept = [(k, v) for k, v in self.headers if not k.startswith("dlq.") and k != REDRIVE_COUNT]
        return Outgoing(topic or self.source_topic, self.key, self.value,
                        kept + [(REDRIVE_COUNT, str(self.redrives + 1).encode())])


@dataclass
class ReasonSummary:
    count: int = 0
    first: str = ""
    last: str = ""
    examples: list[DeadLetter] = field(default_factory=list)


def summarise(letters: list[DeadLetter], examples: int = 3) -> dict[str, ReasonSummary]:
    """Per reason, most frequent first: how many, the first and last ``failed_at``, a few examples."""
    by_reason: dict[str, ReasonSummary] = {}
    for letter in letters:
        entry = by_reason.setdefault(letter.reason, ReasonSummary())
        entry.count += 1
        entry.first = min(entry.first or letter.failed_at, letter.failed_at)
        entry.last = max(entry.last, letter.failed_at)
        if len(entry.examples) < examples:
            entry.examples.append(letter)
    return dict(sorted(by_reason.items(), key=lambda item: (-item[1].count, item[0])))


def summary_text(topic: str, summary: dict[str, ReasonSummary], since: str | None) -> str:
    total = sum(entry.count for entry in summary.values())
    lines = [f"{total} dead letters in {topic}" + (f" since {since}" if since else "")]
    if summary:
        lines.append(f"{'reason':<20} {'count':>7}  {'first':<24}  {'last':<24}")
    for reason, entry in summary.items():
        lines.append(f"{reason:<20} {entry.count:>7}  {entry.first:<24}  {entry.last:<24}")
        for letter in entry.examples:
            key = letter.key.decode("utf-8", "replace") if letter.key is not None else "(no key)"
            lines.append(f"    {key}  {letter.source}  {letter.message[:160]}")
    return "\n".join(lines)


@dataclass
class Selection:
    """Which dead letters ``redrive`` sends: of ``reasons`` (all if empty), failed at or after
    ``since`` (ISO 8601 UTC, compared as text: the headers' fixed format sorts by time), and
    re-driven fewer than ``max_redrives`` times."""

    reasons: frozenset[str] = frozenset()
    since: str | None = None
    max_redrives: int = 3

    def verdict(self, letter: DeadLetter) -> str:
        """``send``, ``other_reason``, ``too_old`` or ``gave_up`` (re-driven ``max_redrives`` times)."""
        if self.reasons and letter.reason not in self.reasons:
            return "other_reason"
        if self.since and letter.failed_at < self.since:
            return "too_old"
        if letter.redrives >= self.max_redrives:
            return "gave_up"
        return "send"


# ---------------------------------------------------------------- Kafka (the consumer and producer are given)

READ_STALL_SECONDS = 60.0


def read_letters(consumer, topic: str, since_ms: int | None = None, from_committed: bool = False):
    """Every message of ``topic`` up to its end offsets as they are now (a snapshot: letters
    arriving meanwhile wait for the next run), from ``since_ms`` (message timestamps) or the
    beginning, or, with ``from_committed``, from the consumer group's committed offsets where it
    has them. Returns (messages, end offsets)."""
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not partitions:
        raise ValueError(f"topic {topic} does not exist")
    consumer.assign(partitions)
    end = consumer.end_offsets(partitions)
    found = consumer.offsets_for_times({tp: since_ms for tp in partitions}) if since_ms is not None else {}
    beginning = consumer.beginning_offsets(partitions)
    for tp in partitions:
        committed = consumer.committed(tp) if from_committed else None
        if committed is not None:
            start = committed
        elif since_ms is not None:
            start = found[tp].offset if found.get(tp) is not None else end[tp]
        else:
            start = beginning[tp]
        consumer.seek(tp, start)
    messages, last_progress = [], time.monotonic()
    while remaining := [tp for tp in partitions if consumer.position(tp) < end[tp]]:
        polled = consumer.poll(timeout_ms=1000)
        for tp, batch in polled.items():
            messages += [m for m in batch if m.offset < end[tp]]
        if polled:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > READ_STALL_SECONDS:
            raise TimeoutError(f"reading {topic}: nothing arrived for {READ_STALL_SECONDS:.0f} s from "
                               f"{', '.join(f'[{tp.partition}]' for tp in remaining)}")
    return messages, end


@dataclass
class RedriveReport:
    sent: list[tuple[DeadLetter, str]] = field(default_factory=list)  # and where to (topic[partition]@offset)
    verdicts: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)

    def text(self) -> str:
        counts = ", ".join(f"{verdict} {count}" for verdict, count in sorted(self.verdicts.items())) or "nothing"
        return f"re-drove {len(self.sent)} dead letters ({counts}); {len(self.failed)} failed to send"


def redrive(consumer, producer, topic: str, selection: Selection, to_topic: str | None = None,
            since_ms: int | None = None, dry_run: bool = False, timeout_s: float = 60.0) -> RedriveReport:
    """Sends the selected dead letters of ``topic`` after the group's committed offsets back to
    their source topics (or ``to_topic``); commits the topic's end offsets to the group only if
    every send was acknowledged (then a second run sends nothing again)."""
    messages, end = read_letters(consumer, topic, since_ms, from_committed=True)
    report, chosen = RedriveReport(), []
    for consumed in messages:
        letter = DeadLetter.of(consumed)
        verdict = selection.verdict(letter)
        report.verdicts[verdict] = report.verdicts.get(verdict, 0) + 1
        if verdict == "send" and not dry_run:
            chosen.append(letter)
    futures = send(producer, [letter.redriven(to_topic) for letter in chosen])
    producer.flush(timeout=timeout_s)
    for letter, future in zip(chosen, futures):
        if future.succeeded():
            metadata = future.value
            report.sent.append((letter, f"{metadata.topic}[{metadata.partition}]@{metadata.offset}"))
        else:
            report.failed.append((letter, str(future.exception) if future.is_done else "not acknowledged in time"))
    if not dry_run and not report.failed:
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in end.items()})
    return report
