"""A throwaway PostgreSQL server for the tests, from the system's own binaries (Debian's postgresql package puts
them in /usr/lib/postgresql/<version>/bin): a fresh cluster in a temporary folder, on a free port of 127.0.0.1,
with a role that logs in with a password over TCP (scram-sha-256) and a database it owns. initdb refuses to run
as root, so under root the server runs as the system's `postgres` user."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

ROLE, DATABASE = "tuner", "studies"
PASSWORD = "Pg-pass-4f1c9e"  # what the tests look for in every file and output


def server_binaries() -> Optional[Path]:
    """The folder of initdb, pg_ctl and psql: the newest under /usr/lib/postgresql, else where pg_ctl on PATH
    really lies (a link on PATH may stand alone)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(Path(path).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


@dataclass(frozen=True)
class Server:
    port: int

    @property
    def url(self) -> str:
        """SQLAlchemy's URL of the database, the role's password in it."""
        return f"postgresql+psycopg://{ROLE}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgresql_server() -> Iterator[Server]:
    """Starts the server, yields it, and stops it (its folder removed)."""
    binaries = server_binaries()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="mfac-postgres-"))
    data, sockets, port = root / "data", root / "sockets", free_port()
    sockets.mkdir()
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")

    def run(*command: str) -> None:
        done = subprocess.run([*as_postgres, *command], capture_output=True, text=True, cwd=root)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()}")

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8")
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "start", "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=50")
        try:
            psql = [str(binaries / "psql"), "-h", str(sockets), "-p", str(port), "-U", "postgres", "-v",
                    "ON_ERROR_STOP=1", "-c"]
            run(*psql, f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            run(*psql, f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
            yield Server(port)
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
