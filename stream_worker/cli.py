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

    return _until_stopped(*build_worker(_apply_engine_options(config, args)))


def cmd_sink(args: argparse.Namespace, config) -> int:
    """The results sink: the results topic into PostgreSQL until SIGTERM."""
    from stream_worker.sink.wiring import build_sink

    return _until_stopped(*build_sink(config))


def cmd_replay(args: argparse.Namespace, config) -> int:
    """Reprocesses a time range of the input topic under its own consumer group, then stops."""
    from stream_worker.core.times import epoch_ms, header_time
    from stream_worker.streaming.kafka_clients import make_consumer
    from stream_worker.streaming.replay import plan_range
    from stream_worker.streaming.wiring import build_worker

    config = _apply_engine_options(config, args)
    if args.group == config.kafka.group_id:
        raise ValueError(f"--group {args.group!r} is the live workers' group (kafka.group_id): a replay needs its own")
    start, end = _instant("--from", args.from_time), _instant("--to", args.to) if args.to else None
    if end is not None and end <= start:
        raise ValueError(f"--to {header_time(end)} is not after --from {header_time(start)}")
    _bootstrap_option(config, args)
    config.kafka.group_id = args.group
    config.kafka.input_topics = [args.topic] if args.topic else config.kafka.input_topics
    config.kafka.output_topic = args.output_topic or config.kafka.output_topic
    config.metrics.enabled = args.metrics_port is not None
    config.metrics.port = args.metrics_port or config.metrics.port
    planner = make_consumer(config)
    try:
        replay = plan_range(planner, config.kafka.input_topics, epoch_ms(start), epoch_ms(end))
    finally:
        planner.close(autocommit=False)
    log.info("replaying %d messages of %s from %s to %s as group %s into %s", replay.total - replay.covered,
             config.kafka.input_topics, header_time(start), header_time(end) if end else "their end now",
             args.group, config.kafka.output_topic)
    started = time.perf_counter()
    replay.progress = lambda r: _progress(r.covered, r.total, time.perf_counter() - started)
    code = _until_stopped(*build_worker(config, replay))
    elapsed = time.perf_counter() - started
    print(f"replayed {replay.covered} of {replay.total} messages in {elapsed:.1f} s: {replay.spectra} results to "
          f"{config.kafka.output_topic}, {replay.dead_letters} dead letters"
          + ("" if replay.done() else f"; interrupted: run again with --group {args.group} to resume"), file=sys.stderr)
    return code or (0 if replay.done() else 1)


def cmd_produce(args: argparse.Namespace, config) -> int:
    """Publishes apStar spectra as input messages (inline arrays or file references)."""
    from stream_worker.core.spectrum import InputError
    from stream_worker.io.apstar import read_apstar
    from stream_worker.io.wire import CONTENT_TYPE, encode_inline, encode_reference
    from stream_worker.streaming.kafka_clients import make_producer

    _bootstrap_option(config, args)
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


def _until_stopped(runner, health) -> int:
    """Runs a worker or sink until it stops; its health server goes with it."""
    try:
        return runner.run()
    finally:
        if health is not None:
            health.stop()


def _bootstrap_option(config, args: argparse.Namespace) -> None:
    if args.bootstrap:
        config.kafka.bootstrap_servers = args.bootstrap.split(",")


def _dead_letter_clients(config, args: argparse.Namespace, group_id: str | None):
    """The dead-letter topic, the --since instant, and a consumer in ``group_id`` (None: no group)."""
    import dataclasses

    from stream_worker.streaming.kafka_clients import make_consumer

    _bootstrap_option(config, args)
    config.kafka.delivery = "at_least_once"  # no transactions: the tools see what was written
    since = _instant("--since", args.since) if args.since else None
    consumer = make_consumer(dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, group_id=group_id)))
    return args.topic or config.kafka.dead_letter_topic, since, consumer


def cmd_deadletters(args: argparse.Namespace, config) -> int:
    """Summarises the dead-letter topic: counts by reason, first and last, a few examples each."""
    from stream_worker.core.times import epoch_ms, header_time
    from stream_worker.streaming.deadletters import DeadLetter, read_letters, summarise, summary_text

    topic, since, consumer = _dead_letter_clients(config, args, None)
    try:
        messages, _ = read_letters(consumer, topic, epoch_ms(since))
    finally:
        consumer.close()
    letters = [DeadLetter.of(m) for m in messages]
    if args.reason:
        letters = [letter for letter in letters if letter.reason in args.reason]
    print(summary_text(topic, summarise(letters, args.examples), header_time(since) if since else None))
    return 0


def cmd_redrive(args: argparse.Namespace, config) -> int:
    """Re-publishes chosen dead letters to the topics they came from, once per group."""
    from stream_worker.core.times import epoch_ms, header_time
    from stream_worker.streaming.deadletters import Selection, redrive
    from stream_worker.streaming.kafka_clients import make_producer

    topic, since, consumer = _dead_letter_clients(config, args, args.group)
    producer = make_producer(config)
    selection = Selection(frozenset(args.reason or ()), header_time(since) if since else None, args.max_redrives)
    try:
        report = redrive(consumer, producer, topic, selection, args.to_topic,
                         epoch_ms(since), dry_run=args.dry_run)
    finally:
        producer.close()
        consumer.close()
    for letter, where in report.sent:
        key = letter.key.decode("utf-8", "replace") if letter.key is not None else "(no key)"
        print(f"sent\t{key}\t{letter.reason}\t{letter.source} -> {where}\tredrive {letter.redrives + 1}")
    for letter, why in report.failed:
        print(f"FAILED\t{letter.source}\t{why}")
    print(("dry run: would have " if args.dry_run else "") + report.text(), file=sys.stderr)
    return 1 if report.failed else 0


def _instant(option: str, text: str):
    from stream_worker.core.times import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"{option} {exc}") from None


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

    replay = sub.add_parser("replay", parents=[common],
                            help="reprocess a time range of the input topic under its own group, then stop")
    replay.add_argument("--from", dest="from_time", required=True, help="ISO 8601 (UTC) or an age (6h, 2d)")
    replay.add_argument("--to", default=None, help="ISO 8601 (UTC) or an age (default: the topic's end now)")
    replay.add_argument("--group", required=True, help="the replay's consumer group (not kafka.group_id)")
    replay.add_argument("--topic", default=None, help="default: kafka.input_topics")
    replay.add_argument("--output-topic", default=None, help="default: kafka.output_topic")
    replay.add_argument("--bootstrap", default=None, help="host:port[,host:port] (default: kafka.bootstrap_servers)")
    replay.add_argument("--metrics-port", type=int, default=None, help="serve /metrics and /readyz there (default: none)")
    _engine_options(replay)
    replay.set_defaults(func=cmd_replay)

    produce = sub.add_parser("produce", parents=[common], help="publish apStar spectra as input messages")
    produce.add_argument("files", nargs="+", type=Path)
    produce.add_argument("--topic", default=None, help="default: the first of kafka.input_topics")
    produce.add_argument("--bootstrap", default=None, help="host:port[,host:port] (default: kafka.bootstrap_servers)")
    produce.add_argument("--visits", action="store_true", help="also each visit spectrum")
    produce.add_argument("--reference", action="store_true",
                         help="send file references (the worker reads the file) instead of inline arrays")
    produce.set_defaults(func=cmd_produce)

    for name, help_text, func in (
            ("deadletters", "summarise the dead-letter topic by reason", cmd_deadletters),
            ("redrive", "send chosen dead letters back to the topics they came from", cmd_redrive)):
        tool = sub.add_parser(name, parents=[common], help=help_text)
        tool.add_argument("--reason", action="append", help="only this reason (repeatable; default: every reason)")
        tool.add_argument("--since", default=None, help="only dead letters from then on: ISO 8601 (UTC) or an age (6h, 2d)")
        tool.add_argument("--topic", default=None, help="the dead-letter topic (default: kafka.dead_letter_topic)")
        tool.add_argument("--bootstrap", default=None, help="host:port[,host:port] (default: kafka.bootstrap_servers)")
        tool.set_defaults(func=func)
        if name == "deadletters":
            tool.add_argument("--examples", type=int, default=3, help="examples per reason")
        else:
            tool.add_argument("--group", default="stream-worker-redrive",
                              help="consumer group that remembers what was re-driven")
            tool.add_argument("--to-topic", default=None, help="default: each dead letter's source topic")
            tool.add_argument("--max-redrives", type=int, default=3,
                              help="refuse a message re-driven this many times already")
            tool.add_argument("--dry-run", action="store_true", help="count what would be sent; send and commit nothing")

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
