"""Building kafka-python clients from the config: the only place that knows their option names."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Callable

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.structs import MemberState

from stream_worker.config import Config


def security_options(config: Config) -> dict:
    """TLS and SASL options shared by every client; the password never comes from YAML."""
    kafka = config.kafka
    options = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options.update(
            ssl_cafile=kafka.ssl_cafile, ssl_certfile=kafka.ssl_certfile, ssl_keyfile=kafka.ssl_keyfile,
            ssl_check_hostname=kafka.ssl_check_hostname,
        )
    if kafka.sasl_mechanism:
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=config.sasl_password(),
        )
    return options


def transactional_id(config: Config) -> str:
    """Stable per worker instance (the pod's hostname), so a restarted worker fences its
    predecessor and aborts the transaction it left open instead of waiting for it to time out."""
    return config.kafka.transactional_id or f"{config.kafka.group_id}-{socket.gethostname()}"


ASSIGNORS = {
    "eager": (RangePartitionAssignor, RoundRobinPartitionAssignor),  # kafka-python's default
    "cooperative": (CooperativeStickyAssignor,),
}
"""``kafka.rebalance_protocol`` -> the assignors: eager revokes every partition of every member at
each rebalance; cooperative (KIP-429) moves only the partitions that change owner."""


def joining(consumer) -> bool:
    """Whether the consumer's group join is under way (the only sign of one under cooperative
    rebalancing, where no callback runs before the join completes)."""
    return consumer.group_metadata().state == MemberState.REBALANCING


def make_consumer(config: Config) -> KafkaConsumer:
    kafka = config.kafka
    return KafkaConsumer(
        partition_assignment_strategy=ASSIGNORS[kafka.rebalance_protocol],
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=kafka.group_id,
        client_id=kafka.client_id,
        enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset,
        session_timeout_ms=kafka.session_timeout_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        fetch_max_bytes=kafka.fetch_max_bytes,
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
        isolation_level="read_committed" if kafka.delivery == "exactly_once" else "read_uncommitted",
        **security_options(config),
    )


def make_producer(config: Config) -> KafkaProducer:
    kafka = config.kafka
    options = dict(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=kafka.client_id,
        acks="all",
        enable_idempotence=True,
        compression_type=kafka.compression_type,
        max_request_size=kafka.max_request_size,
        batch_size=kafka.producer_batch_bytes,
        request_timeout_ms=kafka.request_timeout_ms,
        linger_ms=5,
        **security_options(config),
    )
    if kafka.delivery == "exactly_once":
        options.update(transactional_id=transactional_id(config), transaction_timeout_ms=kafka.transaction_timeout_ms)
    producer = KafkaProducer(**options)
    if kafka.delivery == "exactly_once":
        producer.init_transactions()
    return producer


def partition_lag(consumer, timeout_ms: int = 2000) -> dict:
    """Per assigned partition, messages between the consumer's position and the partition's end
    (what KEDA scales on); raises kafka-python's errors when the broker does not answer."""
    partitions = list(consumer.assignment())
    ends = consumer.end_offsets(partitions, timeout_ms=timeout_ms)
    lag = {}
    for tp in partitions:
        position = consumer.position(tp, timeout_ms=timeout_ms)
        if position is not None and tp in ends:
            lag[tp] = max(0, ends[tp] - position)
    return lag


class Rebalance(ConsumerRebalanceListener):
    """Hands a consumer's rebalance callbacks to ``owner.on_revoked`` / ``owner.on_assigned``
    (the worker, the sink): kafka-python wants a listener object."""

    def __init__(self, owner) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked) -> None:
        self.owner.on_revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.owner.on_assigned(assigned)


class BrokerProbe:
    """Why no bootstrap server can be used (None when one can), checked at most every
    ``interval`` seconds: a TCP connection, and with ``tls`` (an ``ssl.SSLContext``) the TLS
    handshake the clients would make, so that readiness names a certificate the client refuses
    (expired, another CA, another host name) instead of waiting for partitions forever.
    Independent of the clients, so readiness stays truthful while the main thread is blocked
    in a flush or commit waiting for a broker that has gone."""

    def __init__(self, bootstrap_servers: list[str], tls: ssl.SSLContext | None = None, interval: float = 2.0,
                 timeout: float = 1.0) -> None:
        self.addresses = [_host_port(server) for server in bootstrap_servers]
        self.tls = tls
        self.interval = interval
        self.timeout = timeout
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._problem: str | None = "not checked yet"

    def problem(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._checked_at >= self.interval:
                problems = []
                for address in self.addresses:
                    problem = self._check(address)
                    if problem is None:
                        problems = []
                        break
                    problems.append(problem)
                self._problem = "; ".join(problems) or None
                self._checked_at = time.monotonic()
            return self._problem

    def connecting(self) -> tuple[bool, str]:
        """Readiness while the Kafka clients are being made: not ready, and why when the probe knows."""
        problem = self.problem()
        return False, f"connecting to Kafka: {problem}" if problem else "connecting to Kafka"

    def _check(self, address: tuple[str, int]) -> str | None:
        where = f"{address[0]}:{address[1]}"
        try:
            connection = socket.create_connection(address, timeout=self.timeout)
        except OSError:
            return f"broker {where} unreachable"
        try:
            if self.tls is not None:
                connection.settimeout(self.timeout)
                connection = self.tls.wrap_socket(connection, server_hostname=address[0])
            return None
        except ssl.SSLCertVerificationError as exc:
            return f"broker {where}: TLS certificate refused: {exc.verify_message}"
        except (ssl.SSLError, OSError) as exc:
            return f"broker {where}: TLS handshake failed: {exc}"
        finally:
            connection.close()


def member_ready(assigned, broker_problem: Callable[[], str | None]) -> tuple[bool, str]:
    """Readiness of a consumer-group member (a worker, a sink): partitions assigned, broker usable."""
    if not assigned:
        return False, "no partitions assigned"
    problem = broker_problem()
    return (False, problem) if problem is not None else (True, "ready")


def broker_probe(config: Config) -> BrokerProbe:
    """The probe of ``kafka.bootstrap_servers``, with the clients' TLS settings."""
    kafka = config.kafka
    tls = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        tls = ssl.create_default_context(cafile=kafka.ssl_cafile)
        tls.check_hostname = kafka.ssl_check_hostname
        if kafka.ssl_certfile:
            tls.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
    return BrokerProbe(kafka.bootstrap_servers, tls)


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]") or "localhost", int(port or 9092)
