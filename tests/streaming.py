"""Helpers for integration tests that run real workers against the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kafka import KafkaConsumer, KafkaProducer

from stream_worker.devtools.kafka_broker import free_ports
from stream_worker.messages import encode_inline
from stream_worker.spectrum import Spectrum
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
        broker.create_topic(self.input, partitions)
        broker.create_topic(self.output, 3)
        broker.create_topic(self.dead_letter, 1)
        return self


class WorkerProcess:
    """``python -m stream_worker run`` configured through the environment, as in a container."""

    def __init__(self, bootstrap: str, topics: Topics, weights: Path, log_path: Path, **settings) -> None:
        self.port = free_ports(1)[0]
        env = {
            "KAFKA__BOOTSTRAP_SERVERS": f"[{bootstrap}]",
            "KAFKA__INPUT_TOPICS": f"[{topics.input}]",
            "KAFKA__OUTPUT_TOPIC": topics.output,
            "KAFKA__DEAD_LETTER_TOPIC": topics.dead_letter,
            "KAFKA__GROUP_ID": topics.group,
            "KAFKA__SESSION_TIMEOUT_MS": "10000",
            "METRICS__PORT": str(self.port),
            "METRICS__HOST": "127.0.0.1",
            "ENGINE__WEIGHTS": str(weights),
            "ENGINE__NUM_DRAWS": "4",
            "INPUTS__DATA_ROOTS": f"[{DATA}]",
            "BATCHING__MAX_SPECTRA": "16",
            "BATCHING__MAX_WAIT_SECONDS": "0.2",
            "LOGGING__FORMAT": "text",
            **{k.upper(): str(v) for k, v in settings.items()},
        }
        environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_WORKER__")}
        environ.update({f"STREAM_WORKER__{k}": v for k, v in env.items()})
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream_worker", "run"], env=environ, cwd=REPO,
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        """Sum of all samples of ``name`` on /metrics."""
        _, text = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.tail()}")

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.log.close()


def produce_spectra(bootstrap: str, topic: str, count: int, prefix: str, seed: int = 0) -> list[str]:
    """Sends ``count`` inline spectra (one per partition key) and returns their ids."""
    flux, ivar = synthetic_spectra(min(count, 8), seed=seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    ids = []
    for i in range(count):
        spectrum_id = f"{prefix}-{i:05d}"
        spectrum = Spectrum(spectrum_id, flux[i % len(flux)], ivar[i % len(ivar)], source_id=f"2M{i:08d}")
        producer.send(topic, key=spectrum_id.encode(), value=encode_inline(spectrum))
        ids.append(spectrum_id)
    producer.flush()
    producer.close()
    return ids


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
