"""Helpers for integration tests that run real workers against the real broker."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from devtools.kafka_broker import local_topic_config
from devtools.worker_process import WorkerProcess
from stream_worker.core.spectrum import Spectrum
from stream_worker.io.wire import encode_inline
from tests.helpers import DATA, small_model, synthetic_spectra
from tests.services import unique_topic

REPO = Path(__file__).resolve().parent.parent


def small_weights(directory: Path) -> Path:
    path = directory / "small.pt"
    if not path.exists():
        torch.save(small_model().state_dict(), path)
    return path


@dataclass
class Topics:
    """Fresh input/output/dead-letter topics and group for one test."""

    input: str = field(default_factory=lambda: unique_topic("in"))
    output: str = field(default_factory=lambda: unique_topic("out"))
    dead_letter: str = field(default_factory=lambda: unique_topic("dlq"))
    group: str = field(default_factory=lambda: unique_topic("group"))

    def create(self, broker, partitions: int = 3) -> Topics:
        broker.create_topic(self.input, partitions, local_topic_config("input"))
        broker.create_topic(self.output, 3, local_topic_config("output"))
        broker.create_topic(self.dead_letter, 1, local_topic_config("dead_letter"))
        return self


REBALANCE_MODES = pytest.mark.parametrize(
    ("batches_in_flight", "rebalance_protocol"), [(2, "eager"), (1, "eager"), (2, "cooperative")],
    ids=["in-flight-2", "in-flight-1", "in-flight-2-cooperative"])
"""For delivery tests whose groups rebalance: each in-flight bound under eager rebalancing (the
default), and the default bound under cooperative (``kafka.rebalance_protocol``)."""


def small_worker(bootstrap: str, topics: Topics, weights: Path, log_path: Path, module: str = "stream_worker",
                 extra_env: dict | None = None, command: str = "run", arguments: tuple[str, ...] = (),
                 **settings) -> WorkerProcess:
    """A worker on the test's topics with a small model and small batches, so tests run fast
    (``command``: another sub-command with the same settings, e.g. ``replay``)."""
    defaults = {
        "kafka__bootstrap_servers": f"[{bootstrap}]",
        "kafka__input_topics": f"[{topics.input}]",
        "kafka__output_topic": topics.output,
        "kafka__dead_letter_topic": topics.dead_letter,
        "kafka__group_id": topics.group,
        "kafka__session_timeout_ms": 10000,
        "engine__weights": weights,
        "engine__num_draws": 4,
        "engine__kernels": "rules",  # one plan in every worker process: redelivered records compare bit for bit
        "inputs__data_roots": f"[{DATA}]",
        "batching__max_spectra": 16,
        "batching__max_wait_seconds": 0.2,
    }
    return WorkerProcess(log_path, cwd=REPO, module=module, extra_env=extra_env, command=command, arguments=arguments,
                         **{**defaults, **settings})


def produce_spectra(bootstrap: str, topic: str, count: int, prefix: str, seed: int = 0,
                    per_second: float | None = None) -> list[str]:
    """Sends ``count`` inline spectra (one per partition key; ``per_second`` of them a second, or
    all at once) and returns their ids once the broker acknowledged every one."""
    flux, ivar = synthetic_spectra(min(count, 8), seed=seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    ids, sent, started = [], [], time.monotonic()
    for i in range(count):
        if per_second:
            time.sleep(max(0.0, started + i / per_second - time.monotonic()))
        spectrum_id = f"{prefix}-{i:05d}"
        spectrum = Spectrum(spectrum_id, flux[i % len(flux)], ivar[i % len(ivar)], source_id=f"2M{i:08d}")
        sent.append(producer.send(topic, key=spectrum_id.encode(), value=encode_inline(spectrum)))
        ids.append(spectrum_id)
    producer.flush()
    producer.close()
    for future in sent:
        future.get(0)  # raises what the broker refused
    return ids


def wait_until(condition, timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until ``condition()`` held; fails the test with ``what`` after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def produce_raw(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in messages:
        producer.send(topic, key=key, value=value, headers=[("origin", b"test")])
    producer.flush()
    producer.close()


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 60, read_committed: bool = False,
            settle: float = 0.0) -> list:
    """Every message of ``topic`` from the start, waiting until at least ``expected`` arrived
    (then ``settle`` seconds more, to catch extra duplicates)."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        group_id=None, isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    messages: list = []
    deadline = time.monotonic() + timeout
    settle_until = None
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=250).values():
            messages.extend(batch)
        if len(messages) >= expected and settle_until is None:
            settle_until = time.monotonic() + settle
        if settle_until is not None and time.monotonic() >= settle_until:
            break
    consumer.close()
    return messages


def records(messages: list) -> list[dict]:
    return [json.loads(m.value) for m in messages]


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum over partitions of the group's committed offsets (read without joining the group)."""
    from kafka import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in partitions)
    finally:
        consumer.close(autocommit=False)
