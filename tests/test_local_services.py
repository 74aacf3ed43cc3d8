"""The local services are a real, usable Kafka broker and Prometheus server.

Everything else in the integration suite builds on these fixtures, so this checks the properties
it relies on: acks=all produce, consumer-group commits, data and offsets surviving a broker
restart, large messages, and Prometheus scraping a prometheus_client endpoint.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, start_http_server

from devtools.kafka_broker import free_ports
from tests.services import unique_topic

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, values: list[bytes], **config: object) -> set[int]:
    """Send ``values`` (keyed by themselves) with acks=all; return the partitions written."""
    with closing(KafkaProducer(bootstrap_servers=bootstrap, acks="all", **config)) as producer:
        futures = [producer.send(topic, key=value[:16], value=value) for value in values]
        producer.flush()
        return {future.get(timeout=30).partition for future in futures}


def group_consumer(bootstrap: str, topic: str, group: str, **config: object) -> KafkaConsumer:
    return KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
        enable_auto_commit=False, **config,
    )


def consume(consumer: KafkaConsumer, count: int, timeout: float = 30) -> list[bytes]:
    """Poll until ``count`` values arrived (failing the test on timeout)."""
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(values) < count:
        assert time.monotonic() < deadline, f"got {len(values)} of {count} messages in {timeout:.0f}s"
        for records in consumer.poll(timeout_ms=500).values():
            values.extend(record.value for record in records)
    return values


def test_produce_and_consume_with_committed_group_offsets(kafka_broker):
    topic = unique_topic("roundtrip")
    kafka_broker.create_topic(topic, 3)
    sent = [f"message-{i:03d}".encode() for i in range(100)]

    assert produce(kafka_broker.bootstrap, topic, sent) == {0, 1, 2}

    with closing(group_consumer(kafka_broker.bootstrap, topic, unique_topic("group"))) as consumer:
        received = consume(consumer, len(sent))
        consumer.commit()
        partitions = [TopicPartition(topic, p) for p in range(3)]
        end_offsets = consumer.end_offsets(partitions)
        committed = {tp: consumer.committed(tp) for tp in partitions}
    assert sorted(received) == sent
    assert committed == end_offsets
    assert sum(committed.values()) == len(sent)


def test_broker_accepts_multi_megabyte_messages(kafka_broker):
    """Batches of spectra exceed Kafka's 1 MB default; the broker is configured for 4 MiB."""
    topic = unique_topic("large")
    kafka_broker.create_topic(topic, 1)
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB

    produce(kafka_broker.bootstrap, topic, [payload], max_request_size=4 * 1024 * 1024)

    with closing(group_consumer(kafka_broker.bootstrap, topic, unique_topic("group"))) as consumer:
        assert consume(consumer, 1) == [payload]


@pytest.mark.slow
def test_messages_and_committed_offsets_survive_a_broker_restart(restartable_kafka):
    broker = restartable_kafka
    topic, group = unique_topic("restart"), unique_topic("group")
    broker.create_topic(topic, 3)
    before = [f"before-{i:02d}".encode() for i in range(20)]
    produce(broker.bootstrap, topic, before)
    partitions = [TopicPartition(topic, p) for p in range(3)]
    with closing(group_consumer(broker.bootstrap, topic, group)) as consumer:
        assert sorted(consume(consumer, len(before))) == before
        consumer.commit()
        committed = {tp: consumer.committed(tp) for tp in partitions}

    bootstrap = broker.bootstrap
    broker.stop()
    assert not broker.running
    broker.start()
    broker.wait_ready()
    assert broker.bootstrap == bootstrap

    after = [f"after-{i:02d}".encode() for i in range(5)]
    produce(broker.bootstrap, topic, after)
    with closing(group_consumer(broker.bootstrap, topic, group)) as consumer:
        assert {tp: consumer.committed(tp) for tp in partitions} == committed
        assert sorted(consume(consumer, len(after))) == after
    with closing(group_consumer(broker.bootstrap, topic, unique_topic("fresh-group"))) as consumer:
        assert sorted(consume(consumer, len(before) + len(after))) == sorted(before + after)


@pytest.mark.slow
def test_prometheus_scrapes_and_evaluates_rules(prometheus_factory, tmp_path: Path):
    registry = CollectorRegistry()
    events = Counter("sw_selftest_events", "Events counted by the service self-test", registry=registry)
    events.inc(3)
    port = free_ports()[0]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n"
        "- name: selftest\n"
        "  rules:\n"
        "  - record: sw:selftest_events:doubled\n"
        "    expr: 2 * sw_selftest_events_total\n"
    )
    try:
        prometheus = prometheus_factory([f"127.0.0.1:{port}"], rule_files=[rules])

        def value_is(expected: float):
            return lambda result: len(result) == 1 and float(result[0]["value"][1]) == expected

        result = prometheus.wait_for("sw_selftest_events_total", value_is(3))
        assert result[0]["metric"]["job"] == "stream-worker"
        events.inc(2)
        prometheus.wait_for("sw_selftest_events_total", value_is(5))
        prometheus.wait_for("sw:selftest_events:doubled", value_is(10))
        with pytest.raises(RuntimeError, match="parse error"):
            prometheus.query("sum(")
    finally:
        server.shutdown()
        thread.join()
