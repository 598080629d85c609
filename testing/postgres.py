"""A real PostgreSQL cluster for tests: `initdb` into a temporary folder, `pg_ctl` on a free
loopback port, one fresh database per test. As root the server runs as the `postgres` user (it
refuses root). Skips where PostgreSQL is not installed (fails in CI).

Fixtures: `postgres_cluster` (session), `postgres_url` (a new empty database).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

from testing.broker import free_port


class PostgresError(RuntimeError):
    """The test cluster could not be made or started."""


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl (Debian keeps them in /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class PostgresCluster:
    """initdb + pg_ctl in `workdir`, listening on 127.0.0.1:`port` only, trust auth for local tests."""

    def __init__(self, bindir: Path, workdir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError("running as root and there is no 'postgres' user to run the server") from None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        kwargs: dict = dict(capture_output=True, text=True, timeout=120)
        if self.user is not None:
            kwargs["user"] = self.user.pw_uid
            kwargs["group"] = self.user.pw_gid
            kwargs["extra_groups"] = []
        proc = subprocess.run(cmd, **kwargs)
        if proc.returncode != 0:
            raise PostgresError(f"{' '.join(cmd)} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        return proc

    def start(self) -> PostgresCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.workdir, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        # Tests need no durability; the store benchmark asks for it.
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='{self.workdir}' "
            f"-c fsync={'on' if self.fsync else 'off'}"
        )
        self._run("pg_ctl", "-D", str(self.datadir), "-o", opts, "-l", str(self.workdir / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        except PostgresError:
            pass

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
