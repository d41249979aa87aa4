"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package (installed by `make
install-test`), a cluster made by `initdb` in a temporary folder and started by `pg_ctl` on a free port of
127.0.0.1, one new database per test, stopped and removed at the end of the session."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from app.processes import free_port

USER = "tuneboard"


def bin_dir() -> Path | None:
    """The newest installed server's programs (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self) -> None:
        programs = bin_dir()
        if programs is None:
            raise RuntimeError("PostgreSQL is not installed: make install-test installs it (apt postgresql)")
        self.bin = programs
        self.folder = Path(tempfile.mkdtemp(prefix="tuneboard-pg-"))
        self.data = self.folder / "cluster"
        self.port = free_port()
        self.names = itertools.count(1)
        # PostgreSQL refuses to run as root: the cluster belongs to the package's own user then
        self.owner = "postgres" if os.geteuid() == 0 else None
        if self.owner:
            account = pwd.getpwnam(self.owner)
            os.chown(self.folder, account.pw_uid, account.pw_gid)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120, cwd=self.folder)

    def start(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        log = str(self.folder / "server.log")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database's SQLAlchemy URL."""
        import psycopg

        name = f"test_{next(self.names)}"
        server = f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres"
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
