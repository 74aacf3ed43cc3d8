"""A real Kafka broker (KRaft) assembled from Maven Central jars: one node, or a cluster of three.

Consumer groups, rebalances, acks and restarts are exactly what the stream worker must get right,
and fakes do not reproduce them, so tests and the quickstart run a real broker. There is no
Docker on the target machines, but Java and Maven Central are available: the jars are resolved
once into ``${STREAM_WORKER_CACHE:-~/.cache/stream_worker}/kafka-<version>/libs`` and the broker
runs as a child JVM. Failover (a broker, the active controller or a coordinator lost) needs
replicas, hence the three-node :class:`LocalKafkaCluster`, whose nodes are each a :class:`LocalKafka`.

Command line::

    python -m devtools.kafka_broker fetch
    python -m devtools.kafka_broker run --data-dir D [--port P]
    python -m devtools.kafka_broker cluster --data-dir D
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.protocol.metadata import CoordinatorType

from devtools.tls import BrokerCertificates, make_certificates

log = logging.getLogger(__name__)

T = TypeVar("T")

POM = Path(__file__).with_name("kafka-pom.xml")
_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}

# Room for a batch of APOGEE spectra (~69 KB each as float32 with ivar) in one record batch.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_STACK_FRAME = re.compile(r"\s+(at |\.\.\. \d+ more)")


def cache_root() -> Path:
    """Where downloaded service artifacts live, shared by every checkout on the machine."""
    return Path(os.environ.get("STREAM_WORKER_CACHE", "~/.cache/stream_worker")).expanduser()


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version pinned in the POM (the single source of truth for it)."""
    node = ET.parse(pom).find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise ValueError(f"{pom} has no <kafka.version> property")
    return node.text.strip()


def fetch_jars(pom: Path = POM) -> Path:
    """Resolve the broker's jars into the cache unless already there; return the lib directory.

    The marker file records the POM's hash, so editing the POM re-resolves; the lock keeps
    concurrent test processes from filling the same directory at once. Maven runs on a copy of the
    POM inside the cache so that it never writes into the (possibly read-only) package directory.
    """
    home = cache_root() / f"kafka-{kafka_version(pom)}"
    libdir = home / "libs"
    marker = home / "libs.complete"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text().strip() == digest:
            return libdir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("Maven (mvn) is needed to fetch the Kafka jars: run scripts/install-services")
        marker.unlink(missing_ok=True)
        shutil.rmtree(libdir, ignore_errors=True)
        shutil.copyfile(pom, home / "pom.xml")
        log.info("resolving Kafka %s jars into %s", kafka_version(pom), libdir)
        started = time.monotonic()
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
             f"-DoutputDirectory={libdir}"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mvn exited with {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        marker.write_text(digest + "\n")
        log.info("resolved %d jars in %.1fs", len(list(libdir.glob("*.jar"))), time.monotonic() - started)
    return libdir


def free_ports(count: int = 1) -> list[int]:
    """Loopback ports that were free a moment ago; bound all at once so that they differ."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a log for an error message, without Java stack frames (they bury the cause)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    kept = [line for line in text.splitlines() if not _STACK_FRAME.match(line)]
    return f"--- last lines of {path} (stack frames omitted) ---\n" + "\n".join(kept[-lines:])


def run_as(user: str | None) -> dict:
    """subprocess options that run a child as ``user`` (with that user's group and no others)."""
    if user is None:
        return {}
    import pwd

    account = pwd.getpwnam(user)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


class ServiceError(RuntimeError):
    """A local service failed to start or become ready; the message carries its log tail."""


class ServiceProcess:
    """A server child process in its own process group, its output appended to a log file.

    The separate group keeps a terminal Ctrl-C from killing the server behind our back, so that
    shutdown always goes through stop() and is orderly.
    """

    def __init__(self, name: str, log_path: Path, stop_signal: signal.Signals = signal.SIGTERM) -> None:
        """``stop_signal``: what asks this server for an orderly shutdown (PostgreSQL's SIGTERM
        waits for every client to disconnect; its SIGINT does not)."""
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self, argv: Sequence[str], cwd: Path, user: str | None = None) -> None:
        """``user``: the account to run as (a server that refuses root, started by root)."""
        if self.running:
            raise ServiceError(f"{self.name} is already running")
        log.info("starting %s: %s", self.name, " ".join(argv))
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **run_as(user),
            )

    def stop(self, timeout: float = 30) -> None:
        """``stop_signal``, then SIGKILL if the process has not exited within ``timeout`` seconds."""
        if not self.running:
            return
        assert self._proc is not None
        log.info("stopping %s", self.name)
        self.send_signal(self.stop_signal)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            self.kill()

    def kill(self) -> None:
        if not self.running:
            return
        assert self._proc is not None
        self.send_signal(signal.SIGKILL)
        self._proc.wait()

    @property
    def pid(self) -> int:
        """The service's process, which leads a process group (a session) of its own."""
        assert self._proc is not None
        return self._proc.pid

    def send_signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def _admin(bootstrap: str, timeout_s: float = 10) -> KafkaAdminClient:
    timeout_ms = int(timeout_s * 1000)
    return KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="stream-worker-devtools",
        request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms,
    )


TOPICS_FILE = Path(__file__).resolve().parent.parent / "k8s" / "kafka-topics" / "topics.yaml"
TOPIC_ROLES = {"input": "apogee.spectra", "output": "apogee.results", "dead_letter": "apogee.deadletter"}


def local_topic_config(role: str, replicas: int = 1) -> dict[str, str]:
    """The production settings of the ``input``, ``output`` or ``dead_letter`` topic
    (``k8s/kafka-topics/topics.yaml``, the one place they are written), for a topic of
    ``replicas`` replicas: without a ``min.insync.replicas`` that they could never satisfy (one
    local broker), with it on a :class:`LocalKafkaCluster`."""
    import yaml

    with TOPICS_FILE.open() as stream:
        spec = next(t["spec"] for t in yaml.safe_load_all(stream) if t["spec"]["topicName"] == TOPIC_ROLES[role])
    return {k: str(v) for k, v in spec["config"].items()
            if k != "min.insync.replicas" or int(v) <= replicas}


def create_topic(bootstrap: str, name: str, partitions: int, config: Mapping[str, str] | None = None,
                 replication_factor: int = 1) -> None:
    """Create a topic unless it exists, and wait until every partition has a leader."""
    with _admin(bootstrap) as admin:
        spec = {"num_partitions": partitions, "replication_factor": replication_factor, "configs": dict(config or {})}
        try:
            admin.create_topics({name: spec})
        except TopicAlreadyExistsError:
            log.debug("topic %s already exists", name)
        admin.wait_for_topics([name])


def _cluster_id() -> str:
    """A random 22-character cluster id, as Kafka's own ``Uuid.randomUuid`` would produce.

    Kafka rejects ids that start with '-' (they look like command-line flags).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class LocalService:
    """What the local broker and Prometheus share: a child process (``self._process``), its
    state, stop/kill, and use as a context manager that starts, waits until ready and stops."""

    _process: ServiceProcess

    def start(self) -> LocalService:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 90) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process.running

    def stop(self, timeout: float = 30) -> None:
        """Orderly shutdown (SIGTERM), escalating to SIGKILL after ``timeout`` seconds."""
        self._process.stop(timeout)

    def kill(self) -> None:
        """Crash the service (SIGKILL), as a process failure would: its connections are reset."""
        self._process.kill()

    def freeze(self) -> None:
        """Stop the service answering (SIGSTOP) without closing a connection, as a machine lost
        to the network looks to its clients: their requests time out instead of failing fast."""
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    @property
    def process_group(self) -> int:
        """Where a fault injected from another process sends its signals (``freeze``'s target)."""
        return self._process.pid

    def serve(self, banner: str) -> None:
        """Command-line use: prints ``banner`` (how to connect), then runs until Ctrl-C or until
        the service exits."""
        print(banner, flush=True)
        try:
            while self.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalKafka(LocalService):
    """A KRaft node, broker and controller in one, on 127.0.0.1 keeping its data in ``data_dir``:
    a single-node cluster by default, or one node of a :class:`LocalKafkaCluster`.

    The ports are fixed for the object's lifetime, so stop() then start() comes back at the same
    bootstrap address with its topics, messages and committed offsets (storage is formatted only
    once per data_dir).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        scram_users: Mapping[str, str] | None = None,
        tls: bool = False,
        node_id: int = 1,
        quorum_voters: str | None = None,
        cluster_id: str | None = None,
        replicas: int = 1,
        config: Mapping[str, str] | None = None,
    ) -> None:
        """``scram_users`` (name → password) adds a SASL_PLAINTEXT listener with SCRAM-SHA-256
        on ``sasl_port`` next to the plaintext one, for testing client authentication. ``tls``
        adds TLS listeners with certificates made on the fly (:attr:`certificates`): SSL on
        ``ssl_port``, the same with an expired certificate on ``expired_port``, and with
        ``scram_users`` SASL_SSL on ``sasl_ssl_port``.

        A node of a cluster takes its ``node_id``, the cluster's ``quorum_voters``
        (``controller.quorum.voters``; by default this node alone) and ``cluster_id`` (written when
        storage is formatted; random by default), and ``replicas``: the replication factor of the
        internal topics and, above 1, of new topics by default, with one replica allowed out of
        sync (``min.insync.replicas``). ``config`` adds or overrides broker properties."""
        self.data_dir = Path(data_dir).resolve()
        # 8 rather than 6: the two given ports may be among them.
        free = [p for p in free_ports(8) if p not in (port, controller_port)]
        self.port = port or free[0]
        self.controller_port = controller_port or free[1]
        self.sasl_port, self.ssl_port, self.expired_port, self.sasl_ssl_port = free[2:6]
        self.scram_users = dict(scram_users or {})
        self.tls = tls
        self.certificates: BrokerCertificates | None = None
        self.heap = heap
        self.node_id = node_id
        self.quorum_voters = quorum_voters or f"{node_id}@127.0.0.1:{self.controller_port}"
        self.cluster_id = cluster_id
        self.replicas = replicas
        self.config = dict(config or {})
        self.properties_path = self.data_dir / "server.properties"
        self.log4j_path = self.data_dir / "log4j2.properties"
        self.broker_log = self.data_dir / "broker.log"
        self.log_dir = self.data_dir / "kraft-logs"
        self._process = ServiceProcess(f"kafka-{node_id}", self.data_dir / "broker.out")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def expired_bootstrap(self) -> str:
        return f"127.0.0.1:{self.expired_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_ssl_port}"

    def start(self) -> LocalKafka:
        """Launch the broker (fetching jars and formatting storage first if needed); see wait_ready()."""
        java = shutil.which("java")
        if java is None:
            raise ServiceError("java (17 or later) is needed to run Kafka: run scripts/install-services")
        libdir = fetch_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        classpath = f"{libdir}/*"
        if not (self.log_dir / "meta.properties").exists():
            self._format_storage(java, classpath)
        self._process.start(
            [java, f"-Xmx{self.heap}", f"-Dlog4j2.configurationFile={self.log4j_path}",
             "-Djava.awt.headless=true", "-cp", classpath, "kafka.Kafka", str(self.properties_path)],
            cwd=self.data_dir,
        )
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        """Block until the port accepts connections and a metadata request succeeds."""
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._error(f"port {self.port} not open after {timeout:.0f}s")
            time.sleep(0.1)
        while True:
            self._check_alive()
            try:
                with _admin(self.bootstrap, timeout_s=max(1.0, min(10.0, deadline - time.monotonic()))) as admin:
                    admin.list_topics()
                log.info("kafka ready at %s", self.bootstrap)
                return
            except KafkaError as exc:
                if time.monotonic() > deadline:
                    raise self._error(f"no metadata from {self.bootstrap} after {timeout:.0f}s: {exc!r}") from exc
            time.sleep(0.2)

    def create_topic(self, name: str, partitions: int, config: Mapping[str, str] | None = None) -> None:
        create_topic(self.bootstrap, name, partitions, config)

    def _write_config(self) -> None:
        replicas, min_isr = str(self.replicas), str(max(1, self.replicas - 1))
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.voters": self.quorum_voters,
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "message.max.bytes": str(MAX_MESSAGE_BYTES),
            "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
        }
        if self.replicas > 1:
            props["default.replication.factor"] = replicas
            props["min.insync.replicas"] = min_isr
        if self.scram_users:
            props["listeners"] += f",SASL://127.0.0.1:{self.sasl_port}"
            props["advertised.listeners"] += f",SASL://127.0.0.1:{self.sasl_port}"
            props["listener.security.protocol.map"] += ",SASL:SASL_PLAINTEXT"
            props["sasl.enabled.mechanisms"] = "SCRAM-SHA-256"
            props["listener.name.sasl.scram-sha-256.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;")
        if self.tls:
            self._add_tls_listeners(props)
        props.update(self.config)
        self.properties_path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        self.log4j_path.write_text(
            "status = warn\n"
            "shutdownHook = disable\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.broker_log}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
        )

    def _add_tls_listeners(self, props: dict[str, str]) -> None:
        if self.certificates is None:
            self.certificates = make_certificates(self.data_dir / "tls")
        listeners = [("SSL", self.ssl_port, "SSL", self.certificates.keystore),
                     ("EXPIRED", self.expired_port, "SSL", self.certificates.expired_keystore)]
        if self.scram_users:
            listeners.append(("SASLSSL", self.sasl_ssl_port, "SASL_SSL", self.certificates.keystore))
            props["listener.name.saslssl.scram-sha-256.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;")
        for name, port, protocol, keystore in listeners:
            props["listeners"] += f",{name}://127.0.0.1:{port}"
            props["advertised.listeners"] += f",{name}://127.0.0.1:{port}"
            props["listener.security.protocol.map"] += f",{name}:{protocol}"
            prefix = f"listener.name.{name.lower()}.ssl"
            props.update({f"{prefix}.keystore.location": str(keystore), f"{prefix}.keystore.type": "PKCS12",
                          f"{prefix}.keystore.password": self.certificates.password,
                          f"{prefix}.key.password": self.certificates.password})

    def _format_storage(self, java: str, classpath: str) -> None:
        log.info("formatting KRaft storage in %s", self.log_dir)
        proc = subprocess.run(
            [java, "-Xmx256m", f"-Dlog4j2.configurationFile={self.log4j_path}", "-cp", classpath,
             "kafka.tools.StorageTool", "format", "-t", self.cluster_id or _cluster_id(), "-c", str(self.properties_path),
             *(arg for name, password in self.scram_users.items()
               for arg in ("--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]"))],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise self._error(f"storage format failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def _check_alive(self) -> None:
        if not self._process.running:
            raise self._error(f"broker process is not running (exit code {self._process.returncode})")

    def _error(self, message: str) -> ServiceError:
        return ServiceError(f"{message}\n{log_tail(self._process.log_path)}\n{log_tail(self.broker_log)}")


# Five partitions, not fifty, for each of __consumer_offsets and __transaction_state: 150 replicas
# of each across three JVMs slow a two-core machine (measured: the first group and transaction
# coordinators answer after about 1 s instead of 2.5 s, a restarted node is back in sync after 4 s
# instead of 5 s), and five still spread the coordinators over the three nodes. Failure detection
# (broker.session.timeout.ms, replica.lag.time.max.ms, the quorum's timeouts) keeps Kafka's
# defaults, so that a failover takes as long as it would in production.
CLUSTER_CONFIG = {"offsets.topic.num.partitions": "5", "transaction.state.log.num.partitions": "5"}


class LocalKafkaCluster(LocalService):
    """Three KRaft nodes, each broker and controller (a :class:`LocalKafka`), on 127.0.0.1, with
    node ``i`` in ``data_dir/node-i``: replication factor 3 and ``min.insync.replicas`` 2, as in
    production, so that tests can kill a partition leader, the active controller or a coordinator.

    The quorum is static (``controller.quorum.voters``); ports are fixed for the object's lifetime,
    so a node killed and started again rejoins with its data at the same address.
    """

    def __init__(self, data_dir: str | os.PathLike[str], nodes: int = 3, heap: str = "384m") -> None:
        self.data_dir = Path(data_dir).resolve()
        ports = free_ports(2 * nodes)
        listeners, controllers = ports[:nodes], ports[nodes:]
        voters = ",".join(f"{i}@127.0.0.1:{port}" for i, port in enumerate(controllers, 1))
        cluster_id = _cluster_id()
        self.nodes = {
            i: LocalKafka(self.data_dir / f"node-{i}", port, controller, heap, node_id=i, quorum_voters=voters,
                          cluster_id=cluster_id, replicas=nodes, config=CLUSTER_CONFIG)
            for i, (port, controller) in enumerate(zip(listeners, controllers), 1)
        }

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes.values())

    @property
    def running(self) -> bool:
        """Whether any node runs: with one killed, the cluster is degraded, not stopped."""
        return any(node.running for node in self.nodes.values())

    def start(self) -> LocalKafkaCluster:
        """Launch every node; none is ready before a majority of the controllers runs (wait_ready)."""
        for node in self.nodes.values():
            node.start()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until every node answers and the cluster's metadata lists every broker, unfenced."""
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            node.wait_ready(max(1.0, deadline - time.monotonic()))
        self._poll(f"all {len(self.nodes)} brokers registered", max(1.0, deadline - time.monotonic()),
                   lambda admin: True if self._brokers(admin) == set(self.nodes) else None)
        log.info("kafka cluster ready at %s", self.bootstrap)

    def start_node(self, node_id: int, timeout: float = 90) -> None:
        """Restart a stopped or killed node (same data dir and ports) and wait until it answers."""
        node = self.nodes[node_id]
        node.start()
        node.wait_ready(timeout)

    def stop(self, timeout: float = 30) -> None:
        """Orderly shutdown of every node at once (one after the other, the last ones would wait for
        a controller quorum that has gone)."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(timeout), self.nodes.values()))

    def kill(self, node_id: int | None = None) -> None:
        """SIGKILL one node (a crashed broker and controller), or every node."""
        for node in self._selected(node_id):
            node.kill()

    def freeze(self, node_id: int | None = None) -> None:
        """SIGSTOP one node (a machine cut off by the network), or every node."""
        for node in self._selected(node_id):
            node.freeze()

    def thaw(self, node_id: int | None = None) -> None:
        for node in self._selected(node_id):
            node.thaw()

    def create_topic(self, name: str, partitions: int, config: Mapping[str, str] | None = None) -> None:
        """Replication factor 3; ``min.insync.replicas`` 2 is the brokers' default unless ``config``
        says otherwise. Returns once each node's metadata has every partition with a leader: a
        group member whose metadata comes from a node that does not know the new topic yet sees
        its partitions change right after the first assignment, and the rejoin that follows is
        one kafka-python 3.0.12 may lose."""
        create_topic(self.bootstrap, name, partitions, config, replication_factor=len(self.nodes))

        def known(admin: KafkaAdminClient) -> bool | None:
            (described,) = admin.describe_topics([name])
            led = [p for p in described["partitions"] if p["leader_id"] >= 0]
            return True if len(led) == partitions else None

        for node in self.nodes.values():
            if node.running:
                self._poll(f"{name} in the metadata of node {node.node_id}", 30, known, node.bootstrap)

    def leader(self, topic: str, partition: int, timeout: float = 30) -> int:
        """The id of the node leading the partition, -1 while none does (from the metadata)."""
        def probe(admin: KafkaAdminClient) -> int | None:
            (described,) = admin.describe_topics([topic])
            return next((p["leader_id"] for p in described["partitions"] if p["partition_index"] == partition), None)

        return self._poll(f"metadata of {topic}", timeout, probe)

    def controller(self, timeout: float = 30) -> int:
        """The id of the active controller: the leader of the KRaft quorum, from DescribeQuorum
        (which a broker forwards to the active controller). Not the metadata's ``controller_id``:
        in KRaft a broker reports some live broker there, since clients cannot reach controllers."""
        def probe(admin: KafkaAdminClient) -> int | None:
            leader = admin.describe_metadata_quorum()["topics"][0]["partitions"][0]["leader_id"]
            return leader if leader in self.nodes else None

        return self._poll("a quorum leader", timeout, probe)

    def group_coordinator(self, group_id: str, timeout: float = 30) -> int:
        """The id of the node coordinating the consumer group (see _coordinator)."""
        return self._coordinator(group_id, CoordinatorType.GROUP, timeout)

    def transaction_coordinator(self, transactional_id: str, timeout: float = 30) -> int:
        """The id of the node coordinating the transactional id (see _coordinator)."""
        return self._coordinator(transactional_id, CoordinatorType.TRANSACTION, timeout)

    def wait_in_sync(self, timeout: float = 120) -> None:
        """Block until every broker is registered and every partition of every topic, internal ones
        included, has a leader and its whole replica set in sync: the state a failover test starts from.
        A node that is not running fails it at once (it could only time out)."""
        down = [i for i, node in self.nodes.items() if not node.running]
        if down:
            raise ServiceError(f"nodes {down} are not running: start_node() them first")

        def probe(admin: KafkaAdminClient) -> bool | None:
            if self._brokers(admin) != set(self.nodes):
                return None
            for topic in admin.describe_topics():
                for partition in topic["partitions"]:
                    if partition["leader_id"] < 0 or set(partition["isr_nodes"]) != set(partition["replica_nodes"]):
                        return None
            return True

        self._poll("every partition with a leader and all replicas in sync", timeout, probe)

    def _coordinator(self, key: str, key_type: CoordinatorType, timeout: float) -> int:
        """FindCoordinator, as the clients themselves send it (the broker answers with the leader of
        the key's partition of __consumer_offsets or __transaction_state, creating that topic if
        need be), through kafka-python's own request handling: a fresh admin client each time, as
        it caches coordinators."""
        return self._poll(f"the coordinator of {key}", timeout,
                          lambda admin: admin._manager.run(admin._find_coordinator_id, key, key_type))

    @staticmethod
    def _brokers(admin: KafkaAdminClient) -> set[int]:
        return {b["broker_id"] for b in admin.describe_cluster()["brokers"] if not b.get("is_fenced")}

    def _poll(self, what: str, timeout: float, probe: Callable[[KafkaAdminClient], T | None],
              bootstrap: str | None = None) -> T:
        """The first answer of ``probe`` that is not None, asking again (with a fresh admin client,
        bootstrapped from ``bootstrap``: by default every node) through the errors of a cluster
        that is losing or electing a leader."""
        deadline = time.monotonic() + timeout
        error: KafkaError | None = None
        while True:
            try:
                with _admin(bootstrap or self.bootstrap) as admin:
                    answer = probe(admin)
                if answer is not None:
                    return answer
            except KafkaError as exc:
                error = exc
            if time.monotonic() > deadline:
                raise ServiceError(f"no {what} after {timeout:.0f}s (last error: {error!r})")
            time.sleep(0.2)

    def _selected(self, node_id: int | None) -> Iterable[LocalKafka]:
        return self.nodes.values() if node_id is None else [self.nodes[node_id]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.kafka_broker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="resolve the Kafka jars into the cache and exit")
    run = commands.add_parser("run", help="run a broker in the foreground until SIGINT/SIGTERM")
    run.add_argument("--data-dir", required=True, type=Path)
    run.add_argument("--port", type=int)
    run.add_argument("--controller-port", type=int)
    run.add_argument("--heap", default="512m")
    cluster = commands.add_parser("cluster", help="run a three-node cluster in the foreground until SIGINT/SIGTERM")
    cluster.add_argument("--data-dir", required=True, type=Path)
    cluster.add_argument("--heap", default="384m")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python's connection chatter

    if args.command == "fetch":
        print(fetch_jars())
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service = (LocalKafka(args.data_dir, args.port, args.controller_port, args.heap) if args.command == "run"
               else LocalKafkaCluster(args.data_dir, heap=args.heap))
    with service:
        print(service.bootstrap, flush=True)
        while not stop.wait(1.0):
            if not service.running:
                log.error("kafka exited unexpectedly; see %s", service.data_dir)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
