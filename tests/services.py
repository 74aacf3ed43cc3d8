"""Pytest fixtures that run the real local services (a Kafka broker, a three-node Kafka cluster,
Prometheus, PostgreSQL, a schema registry).

Registered from tests/conftest.py with ``pytest_plugins = ["tests.services"]``.

Set ``STREAM_WORKER_TEST_BOOTSTRAP=host:port`` to run against a broker that is already running
instead of starting one; tests that need to stop or restart a broker are then skipped, since
that broker is not ours to control.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import pytest

from devtools.kafka_broker import LocalKafka, LocalKafkaCluster, create_topic
from devtools.postgres_server import LocalPostgres
from devtools.prometheus_server import LocalPrometheus
from devtools.schema_registry import LocalSchemaRegistry

BOOTSTRAP_ENV = "STREAM_WORKER_TEST_BOOTSTRAP"

PrometheusFactory = Callable[..., LocalPrometheus]


def unique_topic(prefix: str = "test") -> str:
    """A topic name no other test (or earlier run against the same broker) has used."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class ExternalKafka:
    """A broker someone else runs: usable like LocalKafka, but never stopped or restarted by us."""

    bootstrap: str

    def create_topic(self, name: str, partitions: int, config: Mapping[str, str] | None = None) -> None:
        create_topic(self.bootstrap, name, partitions, config)

    def wait_ready(self, timeout: float = 90) -> None:
        """Nothing to wait for: the broker is assumed to be up already."""

    def start(self) -> NoReturn:
        self._skip()

    def stop(self, timeout: float = 30) -> NoReturn:
        self._skip()

    def kill(self) -> NoReturn:
        self._skip()

    def _skip(self) -> NoReturn:
        pytest.skip(f"the external broker from {BOOTSTRAP_ENV} cannot be stopped or restarted")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | ExternalKafka]:
    """One broker shared by the whole session; give each test its own topics (unique_topic)."""
    bootstrap = os.environ.get(BOOTSTRAP_ENV)
    if bootstrap:
        yield ExternalKafka(bootstrap)
        return
    with LocalKafka(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture
def restartable_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A private broker the test may stop, kill and start again (same data dir and ports)."""
    if os.environ.get(BOOTSTRAP_ENV):
        pytest.skip(f"{BOOTSTRAP_ENV} is set: not starting brokers of our own")
    with LocalKafka(tmp_path_factory.mktemp("kafka-private")) as broker:
        yield broker


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    """Three brokers (replication factor 3, min.insync.replicas 2) shared by a test module, for
    failover tests; take healthy_cluster instead, to start with every node up and in sync. Per
    module, so that three idle JVMs do not take CPU from the timing-sensitive tests after them."""
    if os.environ.get(BOOTSTRAP_ENV):
        pytest.skip(f"{BOOTSTRAP_ENV} is set: not starting brokers of our own")
    with LocalKafkaCluster(tmp_path_factory.mktemp("kafka-cluster")) as cluster:
        yield cluster


@pytest.fixture
def healthy_cluster(kafka_cluster: LocalKafkaCluster) -> LocalKafkaCluster:
    """The session's cluster once every node runs (a node an earlier test killed is started again,
    one it froze thawed) and every partition has all its replicas in sync."""
    for node_id, node in kafka_cluster.nodes.items():
        if not node.running:
            kafka_cluster.start_node(node_id)
    kafka_cluster.thaw()
    kafka_cluster.wait_in_sync()
    return kafka_cluster


@pytest.fixture
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """``factory(targets, rule_files=())`` returns a ready LocalPrometheus scraping ``targets``."""
    servers: list[LocalPrometheus] = []

    def factory(targets: Sequence[str], rule_files: Sequence[str | os.PathLike[str]] = ()) -> LocalPrometheus:
        server = LocalPrometheus(tmp_path_factory.mktemp("prometheus"), targets, rule_files=rule_files)
        servers.append(server)
        server.start()
        server.wait_ready()
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """One PostgreSQL server shared by the whole session; give each test its own schema
    (``unique_topic("sink").replace("-", "_")``)."""
    with LocalPostgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSchemaRegistry]:
    """One Apicurio Registry shared by the whole session; give each test its own topics, hence
    its own subjects (``<topic>-value``)."""
    with LocalSchemaRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry
