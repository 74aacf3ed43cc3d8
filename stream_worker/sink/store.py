"""The results database (PostgreSQL, psycopg 3): its tables, their migrations, and the one
transaction per batch that stores rows and consumed offsets together.

Tables, in the configured schema (docs/messages.md lists the columns):

- ``results``: one row per ``spectrum_id``, every field of the result record plus where it was
  read (``result_topic``, ``result_partition``, ``result_offset``) and ``stored_at``. A newer
  record of a spectrum (by ``processed_at``) replaces the row; an older one leaves it.
- ``results_history``: the row a record of other weights replaced (``weights_sha256`` changed),
  with ``replaced_at``: the previous model's answer stays queryable.
- ``sink_offsets``: per consumer group and partition, the next offset to store. It moves in the
  same transaction as the rows, so the table and the offsets never disagree.
- ``schema_migrations``: the migrations applied (:data:`MIGRATIONS`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import psycopg
from kafka.structs import TopicPartition
from psycopg import sql

from stream_worker import __version__
from stream_worker.sink.rows import RECORD_COLUMNS, SOURCE_COLUMNS, Row

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: results, their history and the sink's offsets
    """
    CREATE TABLE results (
        schema_version smallint NOT NULL,
        spectrum_id text PRIMARY KEY,
        source_id text,
        spectrum_kind text NOT NULL,
        visit integer,
        telescope text,
        mjd double precision,
        origin text,
        teff double precision,
        e_teff double precision,
        logg double precision,
        e_logg double precision,
        fe_h double precision,
        e_fe_h double precision,
        raw_e_teff double precision,
        raw_e_logg double precision,
        raw_e_fe_h double precision,
        result_flags smallint NOT NULL,
        flag_warn boolean NOT NULL,
        flag_bad boolean NOT NULL,
        error_message text,
        model_name text NOT NULL,
        model_trained boolean NOT NULL,
        weights_sha256 text NOT NULL,
        engine_plan text NOT NULL,
        worker_version text NOT NULL,
        inference_seconds double precision NOT NULL,
        processed_at timestamptz NOT NULL,
        input_topic text NOT NULL,
        input_partition integer NOT NULL,
        input_offset bigint NOT NULL,
        input_timestamp_ms bigint,
        published_at timestamptz NOT NULL,
        result_topic text NOT NULL,
        result_partition integer NOT NULL,
        result_offset bigint NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX results_source_id ON results (source_id);
    CREATE INDEX results_mjd ON results (mjd);
    CREATE INDEX results_result_flags ON results (result_flags);

    CREATE TABLE results_history (LIKE results, replaced_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX results_history_spectrum_id ON results_history (spectrum_id);
    CREATE FUNCTION keep_replaced_result() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    BEGIN
        IF OLD.weights_sha256 IS DISTINCT FROM NEW.weights_sha256 THEN
            INSERT INTO results_history SELECT OLD.*, now();
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER results_keep_replaced BEFORE UPDATE ON results
        FOR EACH ROW EXECUTE FUNCTION keep_replaced_result();

    CREATE TABLE sink_offsets (
        group_id text NOT NULL,
        topic text NOT NULL,
        partition integer NOT NULL,
        next_offset bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (group_id, topic, partition)
    );
    """,
)
"""Migration n (1-based) takes the tables from version n-1 to n. Append, never edit: a database
records the versions it has."""

COLUMNS = RECORD_COLUMNS + SOURCE_COLUMNS
UPSERT = sql.SQL(
    "INSERT INTO results ({columns}) VALUES ({values}) ON CONFLICT (spectrum_id) DO UPDATE SET {updates}, "
    "stored_at = now() WHERE results.processed_at <= EXCLUDED.processed_at"
).format(
    columns=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
    values=sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
    updates=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in COLUMNS
                               if c != "spectrum_id"),
)
ADVANCE = """
    INSERT INTO sink_offsets (group_id, topic, partition, next_offset) VALUES (%s, %s, %s, %s)
    ON CONFLICT (group_id, topic, partition) DO UPDATE
    SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset), updated_at = now()
"""
REJECTED = (psycopg.DataError, psycopg.IntegrityError)
"""What a row itself causes (a value out of a column's range, a NUL in text): that row is
dead-lettered. Any other error (the connection, the server) fails the whole transaction."""


class StoreError(RuntimeError):
    """The database cannot be used as it is (its tables are of a newer version than this sink knows)."""


class Transaction:
    """What one batch does inside its transaction: :meth:`upsert` the rows, :meth:`advance` the offsets."""

    def __init__(self, connection: psycopg.Connection, group_id: str) -> None:
        self.connection = connection
        self.group_id = group_id

    def upsert(self, rows: list[Row]) -> list[tuple[Row, str]]:
        """Stores ``rows`` (in order: of one spectrum's records, the newest wins); returns the rows
        the database refused, with its message, having stored all the others."""
        if not rows:
            return []
        try:
            with self.connection.transaction(), self.connection.cursor() as cursor:  # a savepoint
                cursor.executemany(UPSERT, [row.values for row in rows])
            return []
        except REJECTED:
            pass
        rejected = []
        for row in rows:  # one at a time, each in its own savepoint, to find the bad ones
            try:
                with self.connection.transaction():
                    self.connection.execute(UPSERT, row.values)
            except REJECTED as exc:
                rejected.append((row, f"{type(exc).__name__}: {exc}".strip()))
        return rejected

    def advance(self, topic_offsets: dict[TopicPartition, int]) -> None:
        """The next offset to store, per partition (never moves back)."""
        with self.connection.cursor() as cursor:
            cursor.executemany(ADVANCE, [(self.group_id, tp.topic, tp.partition, offset)
                                         for tp, offset in topic_offsets.items()])


class ResultStore:
    """A connection to the results database, (re)opened on demand, its tables migrated on open."""

    def __init__(self, conninfo: str, password: str | None, db_schema: str, group_id: str,
                 connect_timeout_seconds: float = 10.0) -> None:
        self.conninfo = conninfo
        self.password = password
        self.db_schema = db_schema
        self.group_id = group_id
        self.connect_timeout_seconds = connect_timeout_seconds
        self.connection: psycopg.Connection | None = None

    def open(self) -> psycopg.Connection:
        """The connection, opened (and the tables migrated) if there is none or it broke."""
        if self.connection is not None and not self.connection.closed and not self.connection.broken:
            return self.connection
        self.close()
        options = {"password": self.password} if self.password is not None else {}
        connection = psycopg.connect(self.conninfo, autocommit=True,  # transactions are explicit blocks
                                     connect_timeout=max(1, round(self.connect_timeout_seconds)),
                                     application_name=f"stream-worker-sink {__version__}", **options)
        try:
            migrate(connection, self.db_schema)
        except BaseException:
            connection.close()
            raise
        self.connection = connection
        return connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def offsets(self, topic: str) -> dict[TopicPartition, int]:
        """The next offset to store of each partition of ``topic`` this group has stored into."""
        connection = self.open()
        with connection.transaction():
            found = connection.execute(
                "SELECT partition, next_offset FROM sink_offsets WHERE group_id = %s AND topic = %s",
                (self.group_id, topic)).fetchall()
        return {TopicPartition(topic, partition): offset for partition, offset in found}

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One database transaction: committed when the block ends, rolled back if it raises."""
        connection = self.open()
        with connection.transaction():
            yield Transaction(connection, self.group_id)


def migrate(connection: psycopg.Connection, db_schema: str) -> int:
    """On an autocommit connection: brings the tables in ``db_schema`` to the newest version; returns it. Sinks starting at
    once take turns (an advisory lock); a database newer than this code is refused."""
    schema = sql.Identifier(db_schema)
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"stream-worker-sink:{db_schema}",))
        connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        connection.execute(sql.SQL("SET search_path TO {}").format(schema))
        connection.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL)""")
        current = connection.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        if current > len(MIGRATIONS):
            raise StoreError(f"the tables in schema {db_schema} are at version {current}, newer than this sink "
                             f"(stream-worker {__version__}) knows ({len(MIGRATIONS)}): upgrade the sink")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            log.info("migrating the results tables in schema %s to version %d", db_schema, version)
            connection.execute(MIGRATIONS[version - 1])
            connection.execute("INSERT INTO schema_migrations (version, applied_by) VALUES (%s, %s)",
                               (version, f"stream-worker {__version__}"))
    return len(MIGRATIONS)  # the search_path, set in a committed transaction, stays for the session
