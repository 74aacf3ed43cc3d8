"""One micro-batch, from consumed messages to the messages to publish.

decode → validate (:meth:`Pipeline.prepare`) → preprocess + infer (:meth:`Pipeline.infer`, the
:class:`~stream_worker.engine.estimator.Estimator`) → build records
(:func:`~stream_worker.core.records.build_record`) → serialize (the configured
:mod:`~stream_worker.io.serializers` format; :meth:`Pipeline.finish`). No Kafka here: consumed messages come in as plain objects with ``topic``,
``partition``, ``offset``, ``key``, ``value``, ``headers`` and ``timestamp`` (kafka-python's
``ConsumerRecord`` fits), and what must be published goes out as :class:`Outgoing`. The worker
publishes it and commits; tests drive this module without a broker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from kafka.structs import TopicPartition

from stream_worker.core.estimate import Estimate
from stream_worker.core.records import KafkaSource, build_record
from stream_worker.core.spectrum import InputError, Spectrum, validate_spectrum
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.preprocess import dtype_groups
from stream_worker.io.files import FileReader
from stream_worker.io.serializers import Serializer, serializer
from stream_worker.io.wire import FileReference, decode_input
from stream_worker.streaming.outgoing import Outgoing, dead_letter_message, where

log = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    reason: str
    message: str


@dataclass
class Item:
    """One input message's outcome: its result record or its dead letter, and what to publish."""

    source: TopicPartition
    outgoing: Outgoing
    record: dict | None = None
    dead_letter: DeadLetter | None = None


@dataclass
class BatchResult:
    """What one batch produced, message by message (in input order)."""

    items: list[Item] = field(default_factory=list)
    inference_seconds: float = 0.0

    @property
    def outgoing(self) -> list[Outgoing]:
        return [item.outgoing for item in self.items]

    @property
    def records(self) -> list[dict]:
        return [item.record for item in self.items if item.record is not None]

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return [item.dead_letter for item in self.items if item.dead_letter is not None]

    def only_from(self, partitions: set[TopicPartition]) -> BatchResult:
        """The part of the batch whose inputs come from ``partitions`` (those still owned after a rebalance)."""
        return BatchResult([item for item in self.items if item.source in partitions], self.inference_seconds)


@dataclass
class Prepared:
    """A batch after decode and validation: the spectra for the engine (with their index in the
    batch) and the dead letters so far."""

    messages: list
    accepted: list[tuple[int, Spectrum]]
    done: dict[int, Item]


@dataclass
class Inferred:
    """The engine's answer for a prepared batch: one estimate per accepted spectrum."""

    estimates: list[Estimate]
    seconds: float


class Pipeline:
    """Turns a batch of consumed messages into result and dead-letter messages, in three stages
    (:meth:`prepare` → :meth:`infer` → :meth:`finish`) so that a worker can run the engine's
    stage of one batch while it prepares the next and finishes the previous one."""

    def __init__(self, estimator: Estimator, files: FileReader, output_topic: str, dead_letter_topic: str,
                 max_message_bytes: int, result_format: Serializer | None = None,
                 result_headers: tuple[tuple[str, bytes], ...] = ()) -> None:
        """``result_format``: how each record becomes a message value (default JSON);
        ``result_headers``: added to every result message (a replay names itself)."""
        self.estimator = estimator
        self.files = files
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_message_bytes = max_message_bytes
        self.result_format = result_format or serializer("json")
        if self.result_format.encode is None:
            raise ValueError(f"output format {self.result_format.name!r} cannot encode one record per message")
        content_type = self.result_format.content_type
        self.result_headers = ([("content-type", content_type.encode())] if content_type else []) + list(result_headers)

    def decode(self, message) -> Spectrum:
        """decode + validate one message; raises :class:`InputError` with a reason code."""
        if message.value is not None and len(message.value) > self.max_message_bytes:
            raise InputError("oversized", f"{len(message.value)} bytes exceeds inputs.max_message_bytes={self.max_message_bytes}")
        decoded = decode_input(message.value)
        spectrum = self.files.read(decoded) if isinstance(decoded, FileReference) else decoded
        return validate_spectrum(spectrum)

    def prepare(self, messages: list) -> Prepared:
        """decode + validate every message (host side); bad ones become dead letters here."""
        accepted: list[tuple[int, Spectrum]] = []
        done: dict[int, Item] = {}
        for index, message in enumerate(messages):
            try:
                accepted.append((index, self.decode(message)))
            except InputError as exc:
                done[index] = self._dead_letter(message, exc.reason, str(exc))
            except Exception as exc:  # a bug or an unforeseen input must not stop the stream
                log.exception("unexpected error decoding %s", where(message))
                done[index] = self._dead_letter(message, "internal_error", f"{type(exc).__name__}: {exc}")
        return Prepared(messages, accepted, done)

    def infer(self, prepared: Prepared) -> Inferred:
        """preprocess + infer (the engine's side: the worker runs this on its engine thread)."""
        if not prepared.accepted:
            return Inferred([], 0.0)
        started = time.perf_counter()
        spectra = [spectrum for _, spectrum in prepared.accepted]
        estimates = self.estimator.estimate(
            np.stack([s.flux for s in spectra]),  # the batch's one copy of the flux
            stacked_rows([s.ivar for s in spectra]),  # and of the ivar, each row in its dtype
            [s.spectrum_id for s in spectra],
        )
        return Inferred(estimates, time.perf_counter() - started)

    def finish(self, prepared: Prepared, inferred: Inferred) -> BatchResult:
        """build records + serialize (host side), in input order with the dead letters."""
        done = dict(prepared.done)
        provenance = self.estimator.provenance
        for (index, spectrum), estimate in zip(prepared.accepted, inferred.estimates):
            message = prepared.messages[index]
            record = build_record(spectrum, estimate, provenance, KafkaSource.of(message))
            try:
                value = self.result_format.encode(record)
            except (ValueError, UnicodeError) as exc:  # one bad record must not fail the batch
                log.exception("cannot encode the record of %s", where(message))
                done[index] = self._dead_letter(message, "internal_error", f"{type(exc).__name__}: {exc}")
                continue
            outgoing = Outgoing(self.output_topic, spectrum.spectrum_id.encode(), value, self.result_headers)
            done[index] = Item(_source(message), outgoing, record=record)
        return BatchResult([done[index] for index in range(len(prepared.messages))], inferred.seconds)

    def run(self, messages: list) -> BatchResult:
        """The three stages in turn: what the worker overlaps across batches."""
        prepared = self.prepare(messages)
        return self.finish(prepared, self.infer(prepared))

    def _dead_letter(self, message, reason: str, text: str) -> Item:
        outgoing = dead_letter_message(message, reason, text, self.dead_letter_topic, self.max_message_bytes)
        return Item(_source(message), outgoing, dead_letter=DeadLetter(reason, text))


def stacked_rows(rows: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """The rows as one ``(N, L)`` array if they share a dtype, else each row a view of its dtype's
    stack: one copy, in any case writable (decoded rows are read-only views of their messages),
    and no row converted to another precision (numpy stacks big-endian rows in native order)."""
    groups = dtype_groups(rows)
    if len(groups) == 1:
        return np.stack(rows)
    stacked: list = [None] * len(rows)
    for indices in groups.values():
        for i, row in zip(indices, np.stack([rows[i] for i in indices])):
            stacked[i] = row
    return stacked


def _source(message) -> TopicPartition:
    return TopicPartition(message.topic, message.partition)
