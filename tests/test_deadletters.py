"""Operators' dead-letter tools: the summary (``stream-worker deadletters``) and re-driving
(``stream-worker redrive``), pure parts first, then the round trip through a real worker."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys

import pytest

from stream_worker.io.wire import dead_letter_headers, encode_reference
from stream_worker.core.times import parse_time
from stream_worker.streaming.deadletters import REDRIVE_COUNT, DeadLetter, Selection, summarise
from tests.helpers import GIANT_FILE
from tests.results import Message
from tests.streaming import REPO, Topics, consume, produce_raw, records, wait_until


def dead_letter(reason: str, failed_at: str = "2026-12-01T10:00:00.000Z", key: bytes = b"k",
                headers: list | None = None, offset: int = 3) -> Message:
    """A dead letter as the worker writes it, of an input from ``apogee.spectra[0]@offset``."""
    meta = dead_letter_headers(headers or [("origin", b"pipeline")], reason, f"why: {reason}", "apogee.spectra", 0,
                               offset)
    meta = [(k, failed_at.encode()) if k == "dlq.failed_at" else (k, v) for k, v in meta]
    return Message(b"original value", key, topic="apogee.deadletter", offset=offset, headers=meta)


def test_a_redriven_message_is_the_original_with_a_count_that_survives_failing_again():
    letter = DeadLetter.of(dead_letter("missing_file"))
    assert (letter.reason, letter.source, letter.redrives) == ("missing_file", "apogee.spectra[0]@3", 0)
    again = letter.redriven()
    assert (again.topic, again.key, again.value) == ("apogee.spectra", b"k", b"original value")
    assert again.headers == [("origin", b"pipeline"), (REDRIVE_COUNT, b"1")]
    # it fails again: the worker's dead letter keeps the non-dlq headers, so the count comes back
    second = DeadLetter.of(dead_letter("missing_file", headers=again.headers))
    assert second.redrives == 1
    assert second.redriven("elsewhere").headers == [("origin", b"pipeline"), (REDRIVE_COUNT, b"2")]
    assert second.redriven("elsewhere").topic == "elsewhere"


def test_selection_by_reason_time_and_how_often_it_was_redriven():
    selection = Selection(frozenset({"missing_file"}), since="2026-12-01T09:00:00.000Z", max_redrives=2)
    assert selection.verdict(DeadLetter.of(dead_letter("missing_file"))) == "send"
    assert selection.verdict(DeadLetter.of(dead_letter("decode_error"))) == "other_reason"
    assert selection.verdict(DeadLetter.of(dead_letter("missing_file", "2026-12-01T08:59:59.999Z"))) == "too_old"
    tired = DeadLetter.of(dead_letter("missing_file", headers=[(REDRIVE_COUNT, b"2")]))
    assert selection.verdict(tired) == "gave_up"
    assert Selection().verdict(DeadLetter.of(dead_letter("decode_error"))) == "send"


def test_the_summary_counts_each_reason_with_its_first_and_last_time_most_frequent_first():
    letters = [DeadLetter.of(dead_letter(reason, at, key=f"{reason}-{i}".encode()))
               for i, (reason, at) in enumerate([("wrong_shape", "2026-12-01T10:00:00.000Z"),
                                                 ("missing_file", "2026-12-01T12:00:00.000Z"),
                                                 ("missing_file", "2026-12-01T08:00:00.000Z"),
                                                 ("missing_file", "2026-12-01T11:00:00.000Z")])]
    summary = summarise(letters, examples=2)
    assert list(summary) == ["missing_file", "wrong_shape"]
    missing = summary["missing_file"]
    assert (missing.count, missing.first, missing.last) == (3, "2026-12-01T08:00:00.000Z", "2026-12-01T12:00:00.000Z")
    assert [letter.key for letter in missing.examples] == [b"missing_file-1", b"missing_file-2"]


def test_times_are_iso_or_an_age():
    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_time("6h", now) == dt.datetime(2026, 12, 1, 6, 0, tzinfo=dt.timezone.utc)
    assert parse_time("90m", now) == dt.datetime(2026, 12, 1, 10, 30, tzinfo=dt.timezone.utc)
    assert parse_time("2026-11-30T10:00Z", now) == dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.timezone.utc)
    assert parse_time("2026-11-30T10:00", now).tzinfo == dt.timezone.utc
    with pytest.raises(ValueError, match="'yesterday': not an ISO 8601 time"):
        parse_time("yesterday", now)


# ---------------------------------------------------------------- through a real worker and broker

def tool(*argv: str, bootstrap: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_worker", *argv, "--bootstrap", bootstrap], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("batches_in_flight", [2])
def test_a_fixed_cause_is_redriven_and_processed_once_and_a_lost_cause_stops(kafka_broker, worker_factory, tmp_path):
    topics = Topics().create(kafka_broker, partitions=1)
    roots = tmp_path / "spectra"
    roots.mkdir()
    fixed, lost = roots / "arrives-later.fits", roots / "never.fits"
    produce_raw(kafka_broker.bootstrap, topics.input, [
        (b"fixed", encode_reference(str(fixed), 2, "fixed:visit2")),
        (b"lost", encode_reference(str(lost), 2, "lost:visit2")),
        (b"garbage", b"\x00\x01garbage"),
    ])
    worker = worker_factory(kafka_broker, topics, inputs__data_roots=f"[{roots}]")
    worker.wait_ready()
    consume(kafka_broker.bootstrap, topics.dead_letter, 3)
    bootstrap = kafka_broker.bootstrap

    summary = tool("deadletters", "--topic", topics.dead_letter, bootstrap=bootstrap)
    assert summary.returncode == 0, summary.stderr
    assert "3 dead letters in " + topics.dead_letter in summary.stdout
    lines = {line.split()[0]: line.split()[1] for line in summary.stdout.splitlines()[2:] if not line.startswith(" ")}
    assert lines == {"missing_file": "2", "decode_error": "1"}
    assert "fixed" in summary.stdout and "never.fits" in summary.stdout  # examples: key, where, why

    shutil.copy(GIANT_FILE, fixed)  # the cause is fixed for one of them
    group = ["--topic", topics.dead_letter, "--group", f"{topics.group}-redrive", "--reason", "missing_file",
             "--max-redrives", "1"]
    first = tool("redrive", *group, bootstrap=bootstrap)
    assert first.returncode == 0, first.stderr
    assert sorted(line.split("\t")[1] for line in first.stdout.splitlines()) == ["fixed", "lost"]
    assert "other_reason 1" in first.stderr and "send 2" in first.stderr
    out = records(consume(bootstrap, topics.output, 1, settle=1))
    assert [r["spectrum_id"] for r in out] == ["fixed:visit2"] and out[0]["teff"] > 0

    # "lost" failed again and came back with redrive.count 1: the group sends nothing more
    dead = consume(bootstrap, topics.dead_letter, 4)
    assert dict(dead[-1].headers)[REDRIVE_COUNT] == b"1" and dead[-1].key == b"lost"
    second = tool("redrive", *group, bootstrap=bootstrap)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "" and "re-drove 0 dead letters (gave_up 1)" in second.stderr
    third = tool("redrive", *group, bootstrap=bootstrap)
    assert "re-drove 0 dead letters (nothing)" in third.stderr
    wait_until(lambda: worker.metric("stream_worker_dead_letters_total") == 4, 10, "the 4 dead letters counted")
    assert len(consume(bootstrap, topics.output, 1, settle=2)) == 1  # processed once
    assert worker.terminate() == 0
