"""The sink's Prometheus metrics (``stream_worker_sink_*``), served like the worker's by
:class:`~stream_worker.streaming.metrics.HealthServer`; the dashboard and the alert rules in
``k8s/`` query these names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from stream_worker.streaming.metrics import SECONDS_BUCKETS

ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_start_time_seconds: StreamWorkerRestarting counts restarts
        self.records_consumed = Counter(
            "stream_worker_sink_records_consumed_total", "Result messages taken from Kafka", ["topic"], registry=r)
        self.rows_written = Counter(
            "stream_worker_sink_rows_written_total",
            "Records stored in committed transactions (a record older than its spectrum's row is kept out, "
            "and counted here too)", registry=r)
        self.dead_letters = Counter(
            "stream_worker_sink_dead_letters_total", "Result messages sent to the dead-letter topic", ["reason"],
            registry=r)
        self.transaction_failures = Counter(
            "stream_worker_sink_transaction_failures_total",
            "Database transactions that failed and were retried (their messages are consumed again)", registry=r)
        self.transaction_seconds = Histogram(
            "stream_worker_sink_transaction_seconds", "Time of one batch's database transaction",
            buckets=SECONDS_BUCKETS, registry=r)
        self.transaction_rows = Histogram(
            "stream_worker_sink_transaction_rows", "Rows per committed transaction", buckets=ROWS_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "stream_worker_sink_consumer_lag", "Result messages behind the partition end", ["topic", "partition"],
            registry=r)
        self.last_success = Gauge(
            "stream_worker_sink_last_successful_transaction_timestamp_seconds",
            "Unix time of the last committed transaction", registry=r)
        self.stalled = Gauge(
            "stream_worker_sink_stalled_seconds", "Seconds since the last committed transaction while results wait "
            "(being stored, behind the partitions' ends, or a failed batch); 0 when none wait. /readyz and /healthz "
            "fail past their bounds", registry=r)
        self.ready = Gauge(
            "stream_worker_sink_ready", "1 when the sink is ready (database usable, partitions, broker, progress)",
            registry=r)
        self.dead_letters.labels(reason="schema_mismatch")
