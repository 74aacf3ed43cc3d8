"""``stream-worker replay``: a time range of the input topic reprocessed under its own group,
into its own topic, stopping at the range's end; its bounds, unit-tested, then a real run."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from kafka.structs import TopicPartition

from devtools.kafka_broker import local_topic_config
from stream_worker.streaming.replay import ReplayRange
from tests.services import unique_topic
from tests.streaming import Topics, committed_total, consume, produce_spectra, records, small_weights, small_worker

A, B = TopicPartition("apogee.spectra", 0), TopicPartition("apogee.spectra", 1)


class At:
    def __init__(self, tp: TopicPartition, offset: int) -> None:
        self.topic, self.partition, self.offset = tp.topic, tp.partition, offset


def test_a_range_ends_where_it_says_and_is_done_when_every_partition_is_committed_to_its_end():
    seen = []
    replay = ReplayRange({A: 10, B: 5}, {A: 20, B: 5}, progress=seen.append)
    assert (replay.total, replay.covered, replay.done()) == (10, 0, False)
    assert not replay.beyond(At(A, 19)) and replay.beyond(At(A, 20)) and replay.beyond(At(B, 5))
    assert replay.beyond(At(TopicPartition("apogee.spectra", 2), 0))  # a partition added since
    replay.record({A: 15}, spectra=4, dead_letters=1)
    assert (replay.covered, replay.done(), seen) == (5, False, [replay])
    replay.record({A: 20}, spectra=5, dead_letters=0)
    assert (replay.covered, replay.done(), replay.spectra, replay.dead_letters) == (10, True, 9, 1)


def test_a_resumed_range_starts_where_its_group_committed():
    replay = ReplayRange({A: 10}, {A: 20}, committed={A: 17})
    assert (replay.covered, replay.total) == (7, 10)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.mark.integration
@pytest.mark.slow
def test_replay_reprocesses_exactly_its_time_range_into_its_own_topic_then_stops(kafka_broker, tmp_path,
                                                                                 tmp_path_factory):
    bootstrap = kafka_broker.bootstrap
    topics = Topics().create(kafka_broker)
    produce_spectra(bootstrap, topics.input, 12, "before")
    time.sleep(0.05)
    start = dt.datetime.now(dt.timezone.utc)
    inside = produce_spectra(bootstrap, topics.input, 12, "inside", seed=1)
    time.sleep(0.05)
    end = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.05)
    produce_spectra(bootstrap, topics.input, 12, "after", seed=2)
    replayed = unique_topic("replayed")
    kafka_broker.create_topic(replayed, 3, local_topic_config("output"))
    weights = small_weights(tmp_path_factory.getbasetemp())

    def replay(group: str, name: str) -> tuple[int, str]:
        process = small_worker(bootstrap, topics, weights, tmp_path / f"{name}.log", command="replay",
                               arguments=("--from", iso(start), "--to", iso(end), "--group", group,
                                          "--output-topic", replayed))
        try:
            return process.process.wait(120), process.tail(80)
        finally:
            process.close()

    group = unique_topic("replay")
    code, log = replay(group, "first")
    assert code == 0, log
    assert "replayed 12 of 12 messages" in log and "12 results" in log and "0 dead letters" in log
    out = consume(bootstrap, replayed, 12, settle=1)
    assert sorted(r["spectrum_id"] for r in records(out)) == sorted(inside)
    assert all(dict(m.headers)["replay"] == group.encode() for m in out)
    assert consume(bootstrap, topics.output, 1, timeout=1) == []  # the live output is untouched
    assert committed_total(bootstrap, topics.group, topics.input) == 0  # and so is the live group

    code, log = replay(group, "again")  # the group has done the range: nothing more
    assert code == 0 and "replayed 12 of 12 messages" in log and "0 results" in log, log
    assert len(consume(bootstrap, replayed, 12, settle=1)) == 12

    code, log = replay(topics.group, "live")
    assert code == 2 and "is the live workers' group" in log, log
