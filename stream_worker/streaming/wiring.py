"""``stream-worker run``'s wiring: the I/O edges (engine, Kafka clients, health server) built from
the config and handed to the :class:`~stream_worker.streaming.worker.Worker`."""

from __future__ import annotations

from stream_worker.config import Config
from stream_worker.engine.estimator import Estimator
from stream_worker.io.files import FileReader
from stream_worker.io.serializers import message_serializer
from stream_worker.streaming.batch import Pipeline
from stream_worker.streaming.kafka_clients import broker_probe, make_consumer, make_producer
from stream_worker.streaming.metrics import HealthServer, Metrics, always_live
from stream_worker.streaming.replay import REPLAY_HEADER, ReplayRange
from stream_worker.streaming.worker import EngineThread, Worker


def result_serializer(config: Config):
    """The ``kafka.result_format`` serializer for the output topic (registered with the schema
    registry where the format needs one: a refusal stops start-up with the registry's reason)."""
    kafka = config.kafka
    return message_serializer(kafka.result_format, kafka.output_topic, kafka.schema_registry_url,
                              kafka.schema_compatibility)


def build_worker(config: Config, replay: ReplayRange | None = None) -> tuple[Worker, HealthServer | None]:
    """Everything ``stream-worker run`` needs, wired from the config (the I/O edges live here);
    with ``replay``, the worker of ``stream-worker replay`` (its results say so in a header).

    The health endpoints come up first: while the model loads and the Kafka clients connect
    (which, with wrong credentials or an absent broker, can take forever), /healthz answers and
    /readyz says what the worker is waiting for."""
    metrics = Metrics()
    waiting_for = ["loading the model"]
    started: list[Worker] = []
    probe = broker_probe(config)

    def ready() -> tuple[bool, str]:
        if started:
            return started[0].ready()
        return probe.connecting() if waiting_for[0] == "connecting to Kafka" else (False, waiting_for[0])

    def live() -> tuple[bool, str]:
        return started[0].live() if started else always_live()

    health = None
    if config.metrics.enabled:
        health = HealthServer(metrics, ready, config.metrics.host, config.metrics.port, live).start()
    engine = EngineThread()
    estimator = engine.submit(Estimator.from_config, config.engine).result()
    metrics.set_model(estimator.provenance, str(estimator.device), estimator.num_draws)
    if config.kafka.schema_registry_url:
        waiting_for[0] = f"registering the result schema at {config.kafka.schema_registry_url}"
    pipeline = Pipeline(
        estimator, FileReader(config.inputs.data_roots), config.kafka.output_topic, config.kafka.dead_letter_topic,
        config.inputs.max_message_bytes, result_serializer(config),
        ((REPLAY_HEADER, config.kafka.group_id.encode()),) if replay is not None else (),
    )
    waiting_for[0] = "connecting to Kafka"
    worker = Worker(config, pipeline, make_consumer(config), make_producer(config), metrics,
                    probe.problem, engine, replay, new_producer=lambda: make_producer(config))
    started.append(worker)
    return worker, health
