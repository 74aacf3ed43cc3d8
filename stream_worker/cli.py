"""``stream-worker``: the command line. Sub-commands wire the pieces together; no logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from stream_worker import __version__
from stream_worker.config import ConfigError, load_config
from stream_worker.io.serializers import FORMATS
from stream_worker.logs import setup_logging

log = logging.getLogger("stream_worker")


def _apply_engine_options(config, args: argparse.Namespace):
    """Command-line engine options override the config file."""
    if getattr(args, "weights", None):
        config.engine.weights = args.weights
    if getattr(args, "allow_random_weights", False):
        config.engine.allow_random_weights = True
    if getattr(args, "draws", None) is not None:
        config.engine.num_draws = args.draws
    if getattr(args, "device", None):
        config.engine.device = args.device
    return config


def cmd_infer(args: argparse.Namespace, config) -> int:
    """Runs the engine on apStar files; a file that cannot be read is reported and skipped."""
    import numpy as np

    from stream_worker.core.records import build_record
    from stream_worker.core.spectrum import InputError, validate_spectrum
    from stream_worker.engine.estimator import Estimator
    from stream_worker.io.apstar import read_apstar
    from stream_worker.io.serializers import write_records

    config = _apply_engine_options(config, args)
    estimator = Estimator.from_config(config.engine)
    spectra, failures = [], 0
    for path in args.files:
        try:
            spectra += [validate_spectrum(s) for s in read_apstar(path, visits=args.visits)]
        except InputError as exc:
            failures += 1
            log.error("skipping %s: [%s] %s", path, exc.reason, exc)
    records, started = [], time.perf_counter()
    provenance = estimator.provenance
    step = estimator.chunk_spectra
    for start in range(0, len(spectra), step):
        chunk = spectra[start : start + step]
        estimates = estimator.estimate(
            np.stack([s.flux for s in chunk]), [s.ivar for s in chunk], [s.spectrum_id for s in chunk]
        )
        records += [build_record(s, e, provenance) for s, e in zip(chunk, estimates)]
        _progress(len(records), len(spectra), time.perf_counter() - started)
    write_records(records, args.output, args.format)
    log.info("wrote %d records (%d files skipped)", len(records), failures)
    return 1 if failures else 0


def cmd_run(args: argparse.Namespace, config) -> int:
    """The streaming worker: runs until SIGTERM, then drains and exits 0."""
    from stream_worker.streaming.wiring import build_worker

    config = _apply_engine_options(config, args)
    worker, health = build_worker(config)
    try:
        return worker.run()
    finally:
        if health is not None:
            health.stop()


def cmd_sink(args: argparse.Namespace, config) -> int:
    """The results sink: the results topic into PostgreSQL until SIGTERM."""
    from stream_worker.sink.wiring import build_sink

    sink, health = build_sink(config)
    try:
        return sink.run()
    finally:
        if health is not None:
            health.stop()


def cmd_produce(args: argparse.Namespace, config) -> int:
    """Publishes apStar spectra as input messages (inline arrays or file references)."""
    from stream_worker.core.spectrum import InputError
    from stream_worker.io.apstar import read_apstar
    from stream_worker.io.wire import CONTENT_TYPE, encode_inline, encode_reference
    from stream_worker.streaming.kafka_clients import make_producer

    if args.bootstrap:
        config.kafka.bootstrap_servers = args.bootstrap.split(",")
    config.kafka.delivery = "at_least_once"  # a feeder needs no transactions
    topic = args.topic or config.kafka.input_topics[0]
    producer = make_producer(config)
    sent, futures = [], []
    for path in args.files:
        try:
            spectra = read_apstar(path, visits=args.visits)
        except InputError as exc:
            log.error("skipping %s: [%s] %s", path, exc.reason, exc)
            continue
        for spectrum in spectra:
            which = "coadd" if spectrum.visit is None else spectrum.visit
            value = (
                encode_reference(str(Path(path).resolve()), which, spectrum.spectrum_id)
                if args.reference
                else encode_inline(spectrum)
            )
            futures.append(producer.send(topic, key=spectrum.spectrum_id.encode(), value=value,
                                         headers=[("content-type", CONTENT_TYPE.encode())]))
            sent.append((spectrum.spectrum_id, len(value)))
    producer.flush()
    failed = [f for f in futures if not f.succeeded()]
    producer.close()
    for (spectrum_id, size), future in zip(sent, futures):
        where = f"partition {future.value.partition} offset {future.value.offset}" if future.succeeded() else "FAILED"
        print(f"{spectrum_id}\t{size} bytes\t{topic} {where}")
    print(f"sent {len(sent) - len(failed)} of {len(sent)} spectra to {topic}", file=sys.stderr)
    return 1 if failed or not sent else 0


def _progress(done: int, total: int, seconds: float) -> None:
    if sys.stderr.isatty() and total > 1:
        width = 30
        filled = int(width * done / total)
        rate = done / seconds if seconds > 0 else 0.0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} spectra, {rate:.2f}/s")
        sys.stderr.write("\n" if done == total else "")
        sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    config_help = "config.yaml (defaults + environment if omitted)"
    # --config is accepted before or after the sub-command; SUPPRESS keeps a later default from erasing an earlier value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(prog="stream-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stream-worker {__version__}")
    parser.add_argument("--config", type=Path, default=None, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", parents=[common], help="estimate parameters for apStar files")
    infer.add_argument("files", nargs="+", type=Path)
    infer.add_argument("--visits", action="store_true", help="also each visit spectrum, not only the coadd")
    infer.add_argument("-o", "--output", default=None,
                       help="out.fits | out.csv | out.jsonl | out.json (default: JSON lines on stdout)")
    infer.add_argument("--format", default=None, choices=sorted(FORMATS),
                       help="output format (default: from the output's suffix)")
    _engine_options(infer)
    infer.set_defaults(func=cmd_infer)

    run = sub.add_parser("run", parents=[common], help="run the streaming worker (Kafka in, Kafka out)")
    _engine_options(run)
    run.set_defaults(func=cmd_run)

    sink = sub.add_parser("sink", parents=[common], help="store the results topic in PostgreSQL (the sink: section)")
    sink.set_defaults(func=cmd_sink)

    produce = sub.add_parser("produce", parents=[common], help="publish apStar spectra as input messages")
    produce.add_argument("files", nargs="+", type=Path)
    produce.add_argument("--topic", default=None, help="default: the first of kafka.input_topics")
    produce.add_argument("--bootstrap", default=None, help="host:port[,host:port] (default: kafka.bootstrap_servers)")
    produce.add_argument("--visits", action="store_true", help="also each visit spectrum")
    produce.add_argument("--reference", action="store_true",
                         help="send file references (the worker reads the file) instead of inline arrays")
    produce.set_defaults(func=cmd_produce)

    return parser


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="state-dict file or deconstructed_model/ directory")
    parser.add_argument("--allow-random-weights", action="store_true", help="run an untrained network (tests, benchmarks)")
    parser.add_argument("--draws", type=int, default=None, help="Monte Carlo draws per spectrum (0: none)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"stream-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging)
    try:
        return args.func(args, config)
    except (ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 2
