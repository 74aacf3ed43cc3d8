"""The result producer's CPU per record and bytes on disk, by compression and batch size.

``python -m bench.producer [--records 20000] [--rounds 3]``: real result records (~800 B of JSON
each) published through the real local broker as the worker publishes them — bursts of 64 (a
micro-batch), each flushed before the next, with the worker's producer options (acks=all,
idempotent, linger 5 ms) — under each ``kafka.compression_type`` kafka-python can use without
extra packages, and two producer batch sizes. Per setting: this process's CPU time per record
(every thread: the caller's send() and kafka-python's sender), the wall time, and the partition's
log size on the broker per record. Rounds interleave the settings; the section of
``BENCHMARKS.md`` is rewritten.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer

from bench.pipelining import update_benchmarks, value_range
from bench.run import machine
from devtools.kafka_broker import LocalKafka
from tests.results import encoded, result_record

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ((None, 16384), ("gzip", 16384), (None, 131072), ("gzip", 131072))
"""(compression, producer batch.size in bytes): kafka-python's default batch size, and one that
holds a whole micro-batch of results."""
BURST = 64
BEGIN, END = "<!-- bench.producer: begin -->", "<!-- bench.producer: end -->"


def one_run(kafka: LocalKafka, records: list[tuple[bytes, bytes]], compression: str | None, batch_size: int) -> dict:
    topic = f"producer-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, 1)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True,
                             compression_type=compression, batch_size=batch_size, linger_ms=5,
                             max_request_size=4_194_304)
    producer.send(topic, key=b"warm", value=records[0][1]).get(30)
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(records), BURST):
        for key, value in records[start:start + BURST]:
            producer.send(topic, key=key, value=value)
        producer.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    producer.close()
    log_bytes = sum(f.stat().st_size for f in (kafka.log_dir / f"{topic}-0").glob("*.log"))
    n = len(records)
    return {"cpu_us": cpu / n * 1e6, "per_s": n / wall, "bytes": log_bytes / (n + 1)}


def realistic(i: int, rng: random.Random) -> tuple[bytes, bytes]:
    """A result record with full-precision floats, as the engine's are (they compress less than round ones)."""
    values = {name: rng.uniform(low, high) for name, (low, high) in {
        "teff": (3500, 7000), "e_teff": (20, 80), "logg": (0, 5), "e_logg": (0.02, 0.1), "fe_h": (-2, 0.5),
        "e_fe_h": (0.01, 0.05), "raw_e_teff": (10, 40), "raw_e_logg": (0.01, 0.05), "raw_e_fe_h": (0.01, 0.03),
        "inference_seconds": (0.001, 0.01)}.items()}
    spectrum_id = f"apogee-dr17-{i:08d}"
    return spectrum_id.encode(), encoded(result_record(spectrum_id, input_offset=i, **values))


def measure(n: int, rounds: int) -> dict:
    rng = random.Random(0)
    records = [realistic(i, rng) for i in range(n)]
    results: dict = {setting: [] for setting in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp, LocalKafka(Path(tmp) / "kafka") as kafka:
        for _ in range(rounds):
            for setting in SETTINGS:
                results[setting].append(one_run(kafka, records, *setting))
                print(setting, results[setting][-1], flush=True)
    return results


def section(results: dict, n: int, rounds: int, record_bytes: int) -> str:
    lines = [
        BEGIN,
        "## Result producer: compression and batch size (`python -m bench.producer`)",
        "",
        f"{machine()}. {n:,} result records of {record_bytes} B (JSON) published in bursts of {BURST}, each "
        "flushed (as the worker does per micro-batch), acks=all, idempotent, linger 5 ms, one local broker; "
        f"{rounds} rounds interleaved. CPU: this process (send() and the sender thread) per record.",
        "",
        "| compression | batch.size | CPU µs per record | records/s | bytes on disk per record |",
        "|---|---:|---:|---:|---:|",
    ]
    for (compression, batch_size), runs in results.items():
        lines.append(f"| {compression or 'none'} | {batch_size:,} | {value_range([r['cpu_us'] for r in runs])} | "
                     f"{value_range([r['per_s'] for r in runs])} | {value_range([r['bytes'] for r in runs])} |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    results = measure(args.records, args.rounds)
    record_bytes = len(realistic(0, random.Random(0))[1])
    update_benchmarks(args.output, section(results, args.records, args.rounds, record_bytes))


if __name__ == "__main__":
    main()
