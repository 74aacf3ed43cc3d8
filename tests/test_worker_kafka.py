"""The worker against a real Kafka broker: delivery, dead letters, shutdown, crashes, groups."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stream_worker.core.estimate import SCIENCE_FIELDS
from stream_worker.core.spectrum import Spectrum
from stream_worker.io.wire import encode_inline, encode_reference
from tests.helpers import DWARF_FILE, GIANT_FILE
from tests.streaming import (
    REBALANCE_MODES,
    Topics,
    committed_total,
    consume,
    produce_raw,
    produce_spectra,
    records,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def workers(kafka_broker, worker_factory):
    return lambda topics, **settings: worker_factory(kafka_broker, topics, **settings)


def test_n_inputs_give_n_records_with_every_field(kafka_broker, workers):
    topics = Topics().create(kafka_broker)
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 40, "basic")
    produce_raw(kafka_broker.bootstrap, topics.input, [
        (b"giant", encode_reference(str(GIANT_FILE), 2)),
        (b"dwarf", encode_reference(str(DWARF_FILE), "coadd")),
    ])
    worker = workers(topics)
    worker.wait_ready()
    out = records(consume(kafka_broker.bootstrap, topics.output, 42, settle=2))
    assert len(out) == 42
    assert sorted(r["spectrum_id"] for r in out) == sorted(
        ids + ["apStar-dr17-2M17335483-2753043:visit2", "apStar-dr17-2M19485057+5005279:coadd"])
    for record in out:
        assert set(SCIENCE_FIELDS) <= set(record)
        assert record["teff"] > 0 and record["e_teff"] > 10
        assert record["input_topic"] == topics.input and record["input_offset"] >= 0
        assert record["weights_sha256"] and record["schema_version"] == 2
        assert record["engine_plan"].startswith("exact/cpu ")
    by_id = {r["spectrum_id"]: r for r in out}
    visit = by_id["apStar-dr17-2M17335483-2753043:visit2"]
    assert visit["spectrum_kind"] == "visit" and visit["visit"] == 2 and visit["source_id"] == "2M17335483-2753043"
    assert worker.terminate() == 0
    assert committed_total(kafka_broker.bootstrap, topics.group, topics.input) == 42


def test_poison_messages_go_to_the_dead_letter_topic_and_good_ones_go_through(kafka_broker, workers):
    topics = Topics().create(kafka_broker, partitions=1)  # poison and good share the partition
    good_before = produce_spectra(kafka_broker.bootstrap, topics.input, 5, "before")
    poison = [
        (b"p-garbage", b"\x00\x01garbage"),
        (b"p-tombstone", None),
        (b"p-version", b"APSP" + (27).to_bytes(4, "little") + b'{"schema_version":99,"x":1}'),
        (b"p-missing", encode_reference(str(GIANT_FILE.parent / "absent.fits"))),
        (b"p-outside", encode_reference("/etc/passwd")),
    ]
    produce_raw(kafka_broker.bootstrap, topics.input, poison)
    produce_raw(kafka_broker.bootstrap, topics.input, [
        (b"p-short", encode_inline(Spectrum("short", np.ones(100), np.ones(100)))),
        (b"p-nan", encode_inline(Spectrum("nan", np.full(8575, np.nan), np.ones(8575)))),
    ])
    good_after = produce_spectra(kafka_broker.bootstrap, topics.input, 5, "after")
    worker = workers(topics)
    worker.wait_ready()
    out = records(consume(kafka_broker.bootstrap, topics.output, 10, settle=1))
    assert sorted(r["spectrum_id"] for r in out) == sorted(good_before + good_after)
    dead = consume(kafka_broker.bootstrap, topics.dead_letter, 7, settle=1)
    reasons = {m.key: dict(m.headers)["dlq.reason"].decode() for m in dead}
    assert reasons == {
        b"p-garbage": "decode_error", b"p-tombstone": "decode_error", b"p-version": "schema_version",
        b"p-missing": "missing_file", b"p-outside": "path_not_allowed", b"p-short": "wrong_shape",
        b"p-nan": "all_nan_flux",
    }
    garbage = next(m for m in dead if m.key == b"p-garbage")
    assert garbage.value == b"\x00\x01garbage"  # the original bytes, for replay
    headers = dict(garbage.headers)
    assert headers["origin"] == b"test" and headers["dlq.source.topic"].decode() == topics.input
    assert b"does not start with" in headers["dlq.message"]
    assert worker.metric("stream_worker_dead_letters_total") == 7
    assert worker.terminate() == 0


def test_sigterm_drains_and_commits_everything_it_published(kafka_broker, workers):
    topics = Topics().create(kafka_broker)
    worker = workers(topics, batching__max_spectra=8)
    worker.wait_ready()
    produce_spectra(kafka_broker.bootstrap, topics.input, 120, "drain")
    deadline = time.monotonic() + 60
    while worker.metric("stream_worker_records_published_total") < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.terminate() == 0, worker.tail()
    assert "stopped" in worker.tail()
    published = len(consume(kafka_broker.bootstrap, topics.output, 1, settle=2))
    committed = committed_total(kafka_broker.bootstrap, topics.group, topics.input)
    assert 8 <= published
    assert committed == published  # nothing published is left uncommitted, nothing committed unpublished


@REBALANCE_MODES
def test_sigkill_mid_stream_loses_nothing(kafka_broker, workers, rebalance_protocol):
    topics = Topics().create(kafka_broker)
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 150, "crash")
    settings = dict(batching__max_spectra=8, engine__num_draws=20, kafka__rebalance_protocol=rebalance_protocol)
    first = workers(topics, **settings)
    first.wait_ready()
    deadline = time.monotonic() + 60
    while first.metric("stream_worker_records_published_total") < 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    done_before_crash = len(consume(kafka_broker.bootstrap, topics.output, 1, timeout=5, settle=1))
    assert 0 < done_before_crash < 150, "the crash should land mid-stream"
    second = workers(topics, **settings)
    second.wait_ready()
    out = records(consume(kafka_broker.bootstrap, topics.output, 150, timeout=120, settle=2))
    assert set(r["spectrum_id"] for r in out) == set(ids)  # duplicates allowed, loss not
    duplicates = {}
    for r in out:
        duplicates.setdefault(r["spectrum_id"], []).append(r)
    for copies in duplicates.values():  # a redelivered spectrum gets the very same numbers
        assert len({(c["teff"], c["raw_e_teff"]) for c in copies}) == 1
    assert second.terminate() == 0


@REBALANCE_MODES
def test_two_workers_share_the_partitions_and_process_everything(kafka_broker, workers, rebalance_protocol):
    topics = Topics().create(kafka_broker, partitions=4)
    one, two = (workers(topics, kafka__rebalance_protocol=rebalance_protocol) for _ in range(2))
    one.wait_ready()
    two.wait_ready()
    # two's join rebalanced the group, and one may still be rejoining (kafka-python can lose a join:
    # the group then settles without it for a while, and two alone drains these 80 in well under a
    # second): the share is only tested once both hold partitions at the same time
    wait_until(lambda: one.get("/readyz")[0] == two.get("/readyz")[0] == 200, 60, "both workers to hold partitions")
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 80, "pair")
    out = records(consume(kafka_broker.bootstrap, topics.output, 80, timeout=90, settle=2))
    assert sorted(r["spectrum_id"] for r in out) == sorted(ids)
    assert one.metric("stream_worker_records_published_total") > 0
    assert two.metric("stream_worker_records_published_total") > 0
    assert one.metric("stream_worker_records_published_total") + two.metric("stream_worker_records_published_total") == 80
    assert one.terminate() == 0 and two.terminate() == 0


@REBALANCE_MODES
def test_exactly_once_survives_sigkill_without_loss_or_duplicates(kafka_broker, workers, rebalance_protocol):
    topics = Topics().create(kafka_broker)
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 120, "eos")
    settings = dict(kafka__delivery="exactly_once", kafka__transactional_id=f"{topics.group}-tx",
                    batching__max_spectra=8, engine__num_draws=20, kafka__rebalance_protocol=rebalance_protocol)
    first = workers(topics, **settings)
    first.wait_ready()
    deadline = time.monotonic() + 60
    while first.metric("stream_worker_records_published_total") < 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    second = workers(topics, **settings)  # same transactional id: fences the dead one, aborts its open transaction
    second.wait_ready()
    out = records(consume(kafka_broker.bootstrap, topics.output, 120, timeout=120, read_committed=True, settle=3))
    assert sorted(r["spectrum_id"] for r in out) == sorted(ids)  # each exactly once
    assert second.terminate() == 0


@REBALANCE_MODES
def test_exactly_once_through_a_rebalance_publishes_each_result_once(kafka_broker, workers, rebalance_protocol):
    """A second transactional worker joins while the first holds batches in flight: in
    read_committed output every spectrum appears exactly once. More spectra arrive once the
    second holds partitions, so that it has work of its own however long it took to start (on a
    loaded machine the first had once drained the whole backlog before the second joined)."""
    topics = Topics().create(kafka_broker, partitions=4)
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 160, "eos-rebalance")
    settings = dict(kafka__delivery="exactly_once", batching__max_spectra=8, engine__num_draws=20,
                    kafka__rebalance_protocol=rebalance_protocol)
    first = workers(topics, kafka__transactional_id=f"{topics.group}-a", module="tests.fault_worker",
                    extra_env={"FAULT_ENGINE_DELAY_S": "0.5"}, **settings)  # a slow engine: batches stay in flight
    first.wait_ready()
    deadline = time.monotonic() + 60
    while first.metric("stream_worker_records_published_total") < 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = workers(topics, kafka__transactional_id=f"{topics.group}-b", **settings)
    second.wait_ready()
    ids += produce_spectra(kafka_broker.bootstrap, topics.input, 80, "eos-rebalance-after")
    out = records(consume(kafka_broker.bootstrap, topics.output, 240, timeout=120, read_committed=True, settle=3))
    assert sorted(r["spectrum_id"] for r in out) == sorted(ids)  # each exactly once
    assert second.metric("stream_worker_records_published_total") > 0
    assert first.terminate() == 0 and second.terminate() == 0
    assert "partitions revoked" in first.tail(400)


def test_metrics_agree_with_what_was_processed(kafka_broker, workers):
    topics = Topics().create(kafka_broker)
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 30, "metrics")
    produce_raw(kafka_broker.bootstrap, topics.input, [(b"bad", b"nope")])
    worker = workers(topics)
    worker.wait_ready()
    out = records(consume(kafka_broker.bootstrap, topics.output, 30, settle=1))
    assert len(out) == len(ids)
    deadline = time.monotonic() + 10
    while worker.metric("stream_worker_dead_letters_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.metric("stream_worker_messages_consumed_total") == 31
    assert worker.metric("stream_worker_spectra_processed_total") == 30
    assert worker.metric("stream_worker_records_published_total") == 30
    assert worker.metric("stream_worker_end_to_end_latency_seconds_count") == 30
    assert worker.metric("stream_worker_flag_bad_total") == sum(r["flag_bad"] for r in out)
    assert worker.metric('stream_worker_result_flags_total{flag="flag_unreliable_fe_h"}') == sum(
        bool(r["result_flags"] & 8) for r in out)
    assert worker.metric("stream_worker_batch_size_spectra_sum") == 31
    assert worker.metric("stream_worker_ready") == 1
    assert worker.get("/healthz")[0] == 200
    assert worker.terminate() == 0


def test_a_real_prometheus_scrape_shows_the_worker(kafka_broker, workers, prometheus_factory):
    topics = Topics().create(kafka_broker)
    worker = workers(topics)
    worker.wait_ready()
    prometheus = prometheus_factory([f"127.0.0.1:{worker.port}"])
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 25, "scrape")
    assert len(consume(kafka_broker.bootstrap, topics.output, len(ids))) == 25
    prometheus.wait_for("stream_worker_records_published_total", lambda r: r and float(r[0]["value"][1]) == 25,
                        timeout=30)
    assert float(prometheus.query("sum(stream_worker_spectra_processed_total)")[0]["value"][1]) == 25
    assert prometheus.query("stream_worker_model_info")[0]["metric"]["trained"] == "true"
    assert prometheus.query('up{job="stream-worker"}')[0]["value"][1] == "1"
    assert worker.terminate() == 0
