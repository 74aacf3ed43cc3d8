"""Prometheus metrics and the HTTP endpoints (/metrics, /healthz, /readyz).

Each worker owns a registry, so several workers can live in one process (tests). Labels stay
low-cardinality: topic, partition, reason code, flag name. The names here are what the
dashboard and the alert rules in ``k8s/`` query.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stream_worker.core.flags import FLAG_NAMES, set_bits

log = logging.getLogger(__name__)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_start_time_seconds: StreamWorkerRestarting counts restarts
        self.messages_consumed = Counter(
            "stream_worker_messages_consumed_total", "Input messages taken from Kafka", ["topic"], registry=r)
        self.spectra_processed = Counter(
            "stream_worker_spectra_processed_total", "Spectra that went through the network", registry=r)
        self.records_published = Counter(
            "stream_worker_records_published_total", "Result records acknowledged by the broker", registry=r)
        self.dead_letters = Counter(
            "stream_worker_dead_letters_total", "Inputs sent to the dead-letter topic", ["reason"], registry=r)
        self.result_flags = Counter(
            "stream_worker_result_flags_total", "Published records with each result_flags bit set", ["flag"],
            registry=r)
        self.flag_warn = Counter("stream_worker_flag_warn_total", "Published records with flag_warn", registry=r)
        self.flag_bad = Counter("stream_worker_flag_bad_total", "Published records with flag_bad", registry=r)
        self.batch_failures = Counter(
            "stream_worker_batch_failures_total", "Batches whose engine run, publish or commit failed and were retried",
            ["stage"], registry=r)
        self.producer_replacements = Counter(
            "stream_worker_producer_replacements_total",
            "Transactional producers replaced because a broker failure left them unable to end a transaction",
            registry=r)
        self.batch_size = Histogram(
            "stream_worker_batch_size_spectra", "Messages per micro-batch", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "stream_worker_inference_seconds", "Engine time per batch (preprocess + network)",
            buckets=SECONDS_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "stream_worker_batch_seconds", "Whole batch time: decode to commit", buckets=SECONDS_BUCKETS, registry=r)
        self.latency = Histogram(
            "stream_worker_end_to_end_latency_seconds",
            "Input message timestamp to its result acknowledged by the broker", buckets=SECONDS_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "stream_worker_consumer_lag", "Messages behind the partition end", ["topic", "partition"], registry=r)
        self.in_flight = Gauge("stream_worker_in_flight_spectra", "Messages consumed but not yet committed", registry=r)
        self.batches_in_flight = Gauge(
            "stream_worker_batches_in_flight", "Batches handed to the engine and not yet committed "
            "(at most worker.max_batches_in_flight)", registry=r)
        self.last_success = Gauge(
            "stream_worker_last_successful_batch_timestamp_seconds", "Unix time of the last committed batch",
            registry=r)
        self.stalled = Gauge(
            "stream_worker_stalled_seconds", "Seconds since the last committed batch while messages wait "
            "(in flight or lag); 0 when none wait. /readyz and /healthz fail past their bounds", registry=r)
        self.ready = Gauge("stream_worker_ready", "1 when the worker is ready (/readyz: model loaded, partitions, broker, producer, progress)",
                           registry=r)
        self.model_info = Gauge(
            "stream_worker_model_info", "The model in use (value 1)",
            ["model_name", "weights_sha256", "trained", "device", "num_draws", "engine_plan", "worker_version"],
            registry=r)
        for name in FLAG_NAMES.values():
            self.result_flags.labels(flag=name)
        self.dead_letters.labels(reason="decode_error")

    def set_model(self, provenance, device: str, num_draws: int) -> None:
        """``provenance``: the engine's :class:`~stream_worker.core.records.Provenance`."""
        self.model_info.labels(
            model_name=provenance.model_name, weights_sha256=provenance.weights_sha256[:16],
            trained=str(provenance.model_trained).lower(), device=device, num_draws=str(num_draws),
            engine_plan=provenance.engine_plan, worker_version=provenance.worker_version,
        ).set(1)

    def count_published(self, records: list[dict]) -> None:
        self.records_published.inc(len(records))
        for record in records:
            for name in set_bits(record["result_flags"]):
                self.result_flags.labels(flag=name).inc()
            if record["flag_warn"]:
                self.flag_warn.inc()
            if record["flag_bad"]:
                self.flag_bad.inc()


def show_lag(gauge: Gauge, lag: dict) -> None:
    """``lag`` (TopicPartition -> messages) into a ``{topic, partition}`` gauge."""
    for tp, messages in lag.items():
        gauge.labels(topic=tp.topic, partition=str(tp.partition)).set(messages)


def forget_lag(gauge: Gauge, owned) -> None:
    """Drops the lag of partitions no longer ``owned``: their new owner reports it."""
    keep = {(tp.topic, tp.partition) for tp in owned}
    for metric in gauge.collect():
        for sample in metric.samples:
            if (sample.labels["topic"], int(sample.labels["partition"])) not in keep:
                gauge.remove(sample.labels["topic"], sample.labels["partition"])


def always_live() -> tuple[bool, str]:
    return True, "ok"


class HealthServer:
    """Serves /metrics, /healthz (liveness: ``live()`` says why not) and /readyz (``ready()``
    says why not); both answer 503 with the reason when they fail."""

    def __init__(self, metrics, ready: Callable[[], tuple[bool, str]], host: str, port: int,
                 live: Callable[[], tuple[bool, str]] = always_live) -> None:
        """``metrics``: anything with a prometheus ``registry`` (the worker's, the sink's)."""
        registry = metrics.registry
        probes = {"/healthz": live, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in probes:
                    ok, why = probes[path]()
                    self._reply(200 if ok else 503, (why + "\n").encode())
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> HealthServer:
        self.thread.start()
        log.info("metrics and health on port %d", self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
