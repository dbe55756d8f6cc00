"""A throw-away PostgreSQL server for the tests, like the cluster's (cluster/mlflow/postgres.yaml), on loopback only.

Debian's server binaries (``/usr/lib/postgresql/<version>/bin``) are installed with apt-get when missing; a
cluster is made with initdb in a fresh temporary folder, listens on 127.0.0.1 alone (a free port; its unix
socket in that folder; trust auth for 127.0.0.1 only) and is stopped and removed at the end. PostgreSQL
refuses to run as root, so as root the server runs as the unprivileged ``postgres`` user Debian's package
creates. The tests skip only where it cannot be installed or started.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

USER = "attzoom"  # the cluster's superuser (the client's name, not an OS account)
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")


def server_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries: Debian's newest version, else pg_ctl's on PATH."""
    def version(folder: Path) -> tuple:
        return tuple(int(p) for p in re.findall(r"\d+", folder.parent.name))

    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if found := shutil.which("pg_ctl"):
        folders.append(Path(found).resolve().parent)  # /usr/local/bin/pg_ctl links into a Debian folder
    return next((f for f in folders if all((f / tool).is_file() for tool in SERVER_TOOLS)), None)


def install() -> Path:
    """Debian's PostgreSQL server, installed with apt-get (as root, or with passwordless sudo); skips if it cannot be.

    The package's own ``main`` cluster (a system service on port 5432) is not wanted: a createcluster.d
    setting stops the package from creating it.
    """
    if not shutil.which("apt-get"):
        pytest.skip("PostgreSQL is not installed and apt-get is not available to install it")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    no_main = ("mkdir -p /etc/postgresql-common/createcluster.d && echo 'create_main_cluster = false' "
               "> /etc/postgresql-common/createcluster.d/attzoom-tests.conf")
    try:
        for command in (["sh", "-c", no_main], ["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
            done = subprocess.run(sudo + command, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"PostgreSQL could not be installed ({' '.join(command)}: {done.stderr.strip()[-200:]})")
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"PostgreSQL could not be installed ({e})")
    folder = server_bin()
    if folder is None:
        pytest.skip("PostgreSQL was installed but its server binaries (initdb, pg_ctl, postgres) were not found")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running throw-away cluster; ``database()`` makes a fresh, empty database and returns its SQLAlchemy URL."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self._names = itertools.count(1)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"  # the URL users write (psycopg 3)

    def database(self, prefix: str = "db") -> str:
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", connect_timeout=10,
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_server_user(folder: Path) -> list[str]:
    """The command prefix that runs the server's tools as an unprivileged user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    user = next((u for u in ("postgres", "nobody") if _exists(u)), None)
    if user is None or not shutil.which("runuser"):
        pytest.skip("PostgreSQL refuses to run as root, and neither a 'postgres' user nor runuser is here")
    entry = pwd.getpwnam(user)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    return ["runuser", "-u", user, "--"]


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


@contextmanager
def running_server():
    """A throw-away PostgreSQL cluster on 127.0.0.1 for the body; stopped and removed after it."""
    bin_folder = server_bin() or install()
    # Not under pytest's tmp_path: its folders are private to the test's user, and the server may run as another.
    folder = Path(tempfile.mkdtemp(prefix="attzoom-pg-"))
    data, log = folder / "data", folder / "server.log"
    run_as = _as_server_user(folder)

    def tool(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, str(bin_folder / name), *args], cwd=folder, capture_output=True, text=True,
                              timeout=timeout)

    def write(path: Path, text: str) -> None:
        path.write_text(text)
        os.chown(path, folder.stat().st_uid, folder.stat().st_gid)  # the server's user owns its files

    started = False
    try:
        done = tool("initdb", "-D", str(data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--no-locale",
                    "--no-sync")
        if done.returncode != 0:
            pytest.skip(f"PostgreSQL could not be started (initdb: {done.stderr.strip()[-300:]})")
        # loopback alone: the only TCP address it listens on, the only one its authentication admits
        write(data / "pg_hba.conf", "local all all trust\nhost all all 127.0.0.1/32 trust\n")
        for attempt in range(3):  # a free port may be taken between choosing it and the server binding it
            port = free_port()
            settings = (f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{folder}'\n"
                        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 32MB\n")
            write(data / "postgresql.auto.conf", settings)
            done = tool("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start", timeout=90)
            if done.returncode == 0:
                started = True
                break
        if not started:
            text = log.read_text()[-500:] if log.exists() else ""
            pytest.skip(f"PostgreSQL could not be started (pg_ctl: {done.stdout.strip()[-200:]} {text})")
        yield Server(folder, port)
    finally:
        if started:
            tool("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
