"""The results sink's rows per second, against a real local PostgreSQL (fsync on) and broker.

``python -m bench.sink [--records 20000] [--rounds 3]`` measures, rounds interleaved:

- **store**: :class:`~stream_worker.sink.store.ResultStore` alone, in this process, upserting
  rows with their offsets in transactions of 1 (the baseline: a row per commit, what a naive sink
  does), 50 and 500 rows (``sink.max_rows``' default);
- **reader**: :class:`~stream_worker.sink.rows.RowReader` alone (decode, schema check, row);
- **end to end**: a ``stream-worker sink`` process draining a backlog of records from the results
  topic (4 partitions) into the database, from its first stored row to the last, and its CPU time
  per row.

and rewrites its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from kafka import KafkaProducer
from kafka.structs import TopicPartition

from bench.kafka_e2e import cpu_seconds
from bench.pipelining import update_benchmarks, value_range
from devtools.kafka_broker import LocalKafka
from devtools.postgres_server import LocalPostgres
from devtools.worker_process import WorkerProcess
from stream_worker.io.serializers import serializer
from stream_worker.sink.rows import RowReader
from stream_worker.sink.store import ResultStore
from tests.results import encoded, message_of, result_record

REPO = Path(__file__).resolve().parent.parent
TRANSACTION_ROWS = (1, 50, 500)
BEGIN, END = "<!-- bench.sink: begin -->", "<!-- bench.sink: end -->"


def records(n: int, tag: str) -> list[dict]:
    return [result_record(f"{tag}-{i:06d}", input_offset=i, teff=4000.0 + i % 3000) for i in range(n)]


def store_rate(postgres: LocalPostgres, reader: RowReader, n: int, per_transaction: int, tag: str) -> float:
    """Rows per second stored by one connection, ``per_transaction`` rows (and their offset) a commit."""
    rows = [reader.row(message_of(r, offset=i)) for i, r in enumerate(records(n, tag))]
    store = ResultStore(postgres.conninfo, postgres.password, "bench_store", f"store-{tag}")
    store.open()
    started = time.perf_counter()
    for first in range(0, n, per_transaction):
        chunk = rows[first:first + per_transaction]
        with store.transaction() as transaction:
            transaction.upsert(chunk)
            transaction.advance({TopicPartition("apogee.results", 0): first + len(chunk)})
    elapsed = time.perf_counter() - started
    store.close()
    return n / elapsed


def reader_rate(n: int) -> float:
    reader = RowReader(serializer("json").decode)
    messages = [message_of(r, offset=i) for i, r in enumerate(records(n, "reader"))]
    started = time.perf_counter()
    for message in messages:
        reader.row(message)
    return n / (time.perf_counter() - started)


def sink_rate(kafka: LocalKafka, postgres: LocalPostgres, tmp: Path, n: int, tag: str) -> dict:
    """A backlog of ``n`` records drained by one sink process: rows/s and CPU ms per row from the
    first stored row to the last (start-up and the group join are not throughput)."""
    topic, dead = f"{tag}-results", f"{tag}-dlq"
    kafka.create_topic(topic, 4)
    kafka.create_topic(dead, 1)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    for record in records(n, tag):
        producer.send(topic, key=record["spectrum_id"].encode(), value=encoded(record))
    producer.flush()
    producer.close()
    schema = tag.replace("-", "_")
    sink = WorkerProcess(tmp / f"{tag}.log", cwd=REPO, command="sink",
                         extra_env={"STREAM_WORKER_SINK_PASSWORD": postgres.password},
                         kafka__bootstrap_servers=f"[{kafka.bootstrap}]", kafka__output_topic=topic,
                         kafka__dead_letter_topic=dead, sink__database=postgres.conninfo, sink__db_schema=schema,
                         sink__group_id=tag)
    try:
        with postgres.connect(autocommit=True) as connection:
            def stored() -> int:
                try:
                    return connection.execute(f"SELECT count(*) FROM {schema}.results").fetchone()[0]
                except Exception:  # no table yet
                    return 0

            deadline = time.monotonic() + 300
            while (first := stored()) == 0:
                if sink.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the sink stored nothing:\n{sink.tail()}")
                time.sleep(0.005)
            started, cpu_started = time.perf_counter(), cpu_seconds(sink.process.pid)
            while (count := stored()) < n:
                if sink.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the sink stored {count} of {n}:\n{sink.tail()}")
                time.sleep(0.01)
            elapsed, cpu = time.perf_counter() - started, cpu_seconds(sink.process.pid) - cpu_started
    finally:
        sink.close()
    return {"rows_per_s": (n - first) / elapsed, "cpu_ms_per_row": 1000 * cpu / (n - first)}


def measure(n: int, rounds: int) -> dict:
    results: dict = {"store": {size: [] for size in TRANSACTION_ROWS}, "reader": [], "sink": []}
    reader = RowReader(serializer("json").decode)
    with tempfile.TemporaryDirectory() as directory, LocalKafka(Path(directory) / "kafka") as kafka, \
            LocalPostgres(Path(directory) / "postgres", durable=True) as postgres:
        for round_ in range(rounds):
            for size in TRANSACTION_ROWS:
                # a row per commit waits for a WAL flush each time: fewer rows keep the run short
                count = min(n, 2000) if size == 1 else n
                results["store"][size].append(store_rate(postgres, reader, count, size, f"r{round_}t{size}"))
                print(f"round {round_}: store, {size} rows a transaction: {results['store'][size][-1]:.0f}/s",
                      file=sys.stderr)
            results["reader"].append(reader_rate(min(n, 5000)))
            results["sink"].append(sink_rate(kafka, postgres, Path(directory), n, f"sink-r{round_}"))
            print(f"round {round_}: reader {results['reader'][-1]:.0f}/s, sink {results['sink'][-1]}", file=sys.stderr)
    return results


def section(results: dict, n: int, rounds: int, machine: str) -> str:
    baseline = results["store"][1]
    lines = [
        BEGIN,
        "## Results database: `stream-worker sink` (`python -m bench.sink`)",
        "",
        f"A local PostgreSQL 15 with fsync on (each commit waits for its WAL flush, as on a real server),"
        f" the real local broker, {n:,} valid result records; {machine}. Ranges over {rounds} interleaved"
        " rounds. Baseline: one row per transaction, in the same run.",
        "",
        "| what | rows/s | vs one row a transaction |",
        "|---|---:|---:|",
    ]
    for size, rates in results["store"].items():
        ratios = [rate / base for rate, base in zip(rates, baseline)]
        lines.append(f"| store alone, {size} row{'s' if size > 1 else ''} a transaction | {value_range(rates)} | "
                     f"{value_range(ratios, 1)}× |")
    lines.append(f"| row reader alone (decode, schema check, row) | {value_range(results['reader'])} | |")
    sink = results["sink"]
    ratios = [s["rows_per_s"] / base for s, base in zip(sink, baseline)]
    lines += [
        f"| `stream-worker sink`, backlog of {n:,} records, 4 partitions, 500 rows a transaction "
        f"| {value_range([s['rows_per_s'] for s in sink])} | {value_range(ratios, 1)}× |",
        "",
        f"The sink process used {value_range([s['cpu_ms_per_row'] for s in sink], 2)} CPU ms per row (the"
        " database server's share is not counted). Compare the workers' output: one worker's host path tops"
        " out near 1,300 results a second (\"Pipelining\" above), so a few sinks keep up with a large fleet; sinks"
        " share the results topic's partitions (12), so add replicas, up to 12, if `stream_worker_sink_consumer_lag`"
        " grows.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench.run import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    update_benchmarks(args.output, section(measure(args.records, args.rounds), args.records, args.rounds, machine()))


if __name__ == "__main__":
    main()
