"""A real PostgreSQL server (Debian's ``postgresql`` package) in a temporary data directory.

The results sink's exactly-once claim rests on PostgreSQL's transactions, so the tests run it
against the real server: ``initdb`` once per data directory (password authentication, SCRAM),
then ``postgres`` on a free loopback port with its socket in the data directory, never the
machine's own cluster. PostgreSQL refuses to run as root; started by root (CI containers), the
server runs as the package's ``postgres`` account in a directory made for it under /tmp.

Command line (a server for trying the sink by hand, until Ctrl-C)::

    python -m devtools.postgres_server run --data-dir D [--port P]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from devtools.kafka_broker import LocalService, ServiceError, ServiceProcess, free_ports, log_tail, run_as

log = logging.getLogger(__name__)

SERVER_ACCOUNT = "postgres"
"""The account Debian's package creates; the server runs as it when we are root."""


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (``initdb``, ``postgres``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        on_path = shutil.which("postgres")
        if on_path is None:
            raise ServiceError("PostgreSQL is missing: run scripts/install-services postgres")
        return Path(on_path).parent
    return Path(found[-1]).parent


class LocalPostgres(LocalService):
    """PostgreSQL on 127.0.0.1:``port`` with one database and one password-protected role.

    ``durable=False`` (tests) turns off fsync: the server itself is never crashed in the tests,
    only its clients are, and a transaction is atomic and visible at commit either way. Benchmarks
    of the sink use ``durable=True``, what a real server does.
    """

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None, durable: bool = False) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_ports(1)[0]
        self.durable = durable
        self.user, self.database = "stream_worker", "apogee"
        self.password = secrets.token_urlsafe(16)
        self.account = SERVER_ACCOUNT if os.geteuid() == 0 else None
        self._home: Path | None = None  # where the server's files live (its account must own them)
        self._process = ServiceProcess("postgres", self.data_dir / "postgres.log", stop_signal=signal.SIGINT)

    @property
    def conninfo(self) -> str:
        """libpq connection string without the password (give that as ``password=`` or PGPASSWORD)."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={self.database}"

    def connect(self, **options):
        import psycopg

        return psycopg.connect(self.conninfo, password=self.password, **options)

    def start(self) -> LocalPostgres:
        bin_dir = postgres_bin()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        home = self._prepare_home()
        pgdata = home / "pgdata"
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, home, pgdata)
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": str(home),
                    "max_connections": "40", "shared_buffers": "64MB"}
        if not self.durable:
            settings.update(fsync="off", full_page_writes="off", synchronous_commit="off")
        argv = [str(bin_dir / "postgres"), "-D", str(pgdata)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self._process.start(argv, cwd=home, user=self.account)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the role can log in; creates the database on the first start."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if not self._process.running:
                raise self._error(f"postgres exited (code {self._process.returncode})")
            try:
                with psycopg.connect(self.conninfo.replace(f"dbname={self.database}", "dbname=postgres"),
                                     password=self.password, connect_timeout=2, autocommit=True) as connection:
                    if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.database]).fetchone() is None:
                        connection.execute(f'CREATE DATABASE "{self.database}"')
                log.info("postgres ready at 127.0.0.1:%d", self.port)
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise self._error(f"cannot log in at 127.0.0.1:{self.port} after {timeout:.0f}s: {exc}") from exc
            time.sleep(0.1)

    def freeze(self) -> None:
        """Every server process stops answering (SIGSTOP), the postmaster first so that it starts
        no other: each backend runs in a session of its own, so the process group's signal would
        stop only the postmaster while open connections went on being served."""
        for pid in [self._process.pid, *_children(self._process.pid)]:
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in [*_children(self._process.pid), self._process.pid]:
            _signal(pid, signal.SIGCONT)

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        if self._home is not None and self._home != self.data_dir:
            shutil.rmtree(self._home, ignore_errors=True)

    def _prepare_home(self) -> Path:
        """``data_dir`` itself, or (as root) a directory under /tmp that the server's account owns:
        pytest's temporary directories are private to root."""
        if self._home is None:
            if self.account is None:
                self._home = self.data_dir
            else:
                self._home = Path(tempfile.mkdtemp(prefix="stream-worker-postgres-"))
                import pwd

                account = pwd.getpwnam(self.account)
                os.chown(self._home, account.pw_uid, account.pw_gid)
        return self._home

    def _initdb(self, bin_dir: Path, home: Path, pgdata: Path) -> None:
        password_file = home / "initdb-password"
        password_file.write_text(self.password + "\n")
        if self.account is not None:
            shutil.chown(password_file, self.account)
        command = [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", self.user, f"--pwfile={password_file}",
                   "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"]
        with open(self.data_dir / "initdb.log", "ab") as out:
            done = subprocess.run(command, cwd=home, stdout=out, stderr=subprocess.STDOUT, **run_as(self.account))
        password_file.unlink()
        if done.returncode != 0:
            raise ServiceError(f"initdb failed (code {done.returncode})\n{log_tail(self.data_dir / 'initdb.log')}")

    def _error(self, message: str) -> ServiceError:
        return ServiceError(f"{message}\n{log_tail(self._process.log_path)}")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.postgres_server")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a server until Ctrl-C")
    run.add_argument("--data-dir", type=Path, required=True)
    run.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with LocalPostgres(args.data_dir, args.port, durable=True) as server:
        server.serve(f"conninfo: {server.conninfo}\npassword: {server.password}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
