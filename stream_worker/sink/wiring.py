"""``stream-worker sink``'s wiring: the I/O edges (database, Kafka clients, health server) built
from the config and handed to the :class:`~stream_worker.sink.loop.Sink`."""

from __future__ import annotations

import dataclasses

from stream_worker.config import Config
from stream_worker.sink.loop import Sink
from stream_worker.sink.metrics import SinkMetrics
from stream_worker.sink.rows import RowReader
from stream_worker.sink.store import ResultStore
from stream_worker.streaming.kafka_clients import broker_probe, make_consumer, make_producer
from stream_worker.streaming.metrics import HealthServer, always_live
from stream_worker.streaming.wiring import result_serializer


def build_sink(config: Config) -> tuple[Sink, HealthServer | None]:
    """The consumer reads in the sink's own group, ``read_committed`` when the workers publish
    with transactions (``kafka.delivery: exactly_once``); dead letters need no transactions."""
    metrics = SinkMetrics()
    started: list[Sink] = []
    probe = broker_probe(config)

    def ready() -> tuple[bool, str]:
        return started[0].ready() if started else probe.connecting()

    def live() -> tuple[bool, str]:
        return started[0].live() if started else always_live()

    health = None
    if config.metrics.enabled:
        health = HealthServer(metrics, ready, config.metrics.host, config.metrics.port, live).start()
    kafka = dataclasses.replace(config.kafka, group_id=config.sink.group_id)
    consumer = make_consumer(dataclasses.replace(config, kafka=kafka))
    producer = make_producer(dataclasses.replace(config, kafka=dataclasses.replace(kafka, delivery="at_least_once")))
    store = ResultStore(config.sink.database, config.sink_password(), config.sink.db_schema, config.sink.group_id,
                        config.sink.connect_timeout_seconds)
    reader = RowReader(result_serializer(config).decode)
    sink = Sink(config, reader, store, consumer, producer, metrics, probe.problem)
    started.append(sink)
    return sink, health
