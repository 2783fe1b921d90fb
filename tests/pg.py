"""A real PostgreSQL for the store tests: one throwaway cluster per session (initdb into a temp
directory, a free loopback port, its unix socket in that directory, fsync off), and a database of
its own for each test, so tests stay independent. A test may stop the server and start it again.

Debian's server binaries live outside PATH (/usr/lib/postgresql/NN/bin). PostgreSQL refuses to
run as root, and CI runs as root: then the cluster runs as the `postgres` user (Debian's package
makes it), else as `nobody`, its directory given to that user. Without the binaries the tests are
skipped on a laptop and fail in CI (CI set), which installs them (.ci/run).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.mock.net import free_port

MISSING = (
    "PostgreSQL's server (initdb, postgres) is not installed: apt-get install postgresql"
    " (CI installs it)"
)
SUPERUSER = "relayd"
PASSWORD = "pg-secret-Zq7"  # the superuser's: tests check it never shows


def bindir() -> Path | None:
    """Where initdb and postgres are: pg_config's bindir, Debian's newest, or PATH."""
    found: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        found.append(Path(out.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    found += [Path(p) for p in sorted(versions, key=lambda p: int(Path(p).parent.name))[::-1]]
    if initdb := shutil.which("initdb"):
        found.append(Path(initdb).resolve().parent)
    for directory in found:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    return None


def server_binaries() -> Path:
    """initdb's directory; without one the test is skipped on a laptop, and fails in CI."""
    binaries = bindir()
    if binaries is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING + "; CI must run the PostgreSQL store tests", pytrace=False)
        pytest.skip(MISSING)
    return binaries


class PgCluster:
    """A PostgreSQL server as a child process, on 127.0.0.1:`port`."""

    def __init__(self, binaries: Path, workdir: Path, user: str | None) -> None:
        self.binaries, self.workdir, self.user = binaries, workdir, user
        self.data = workdir / "data"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)

    def _spawn(
        self, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a server program as the cluster's user, its output appended to `log`."""
        uid = gid = None
        groups: list[int] | None = None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            uid, gid, groups = entry.pw_uid, entry.pw_gid, []
        with log.open("ab") as out:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                user=uid,
                group=gid,
                extra_groups=groups,
            )

    def init(self) -> None:
        """initdb: UTF8, C locale, a password for the superuser (trust for nothing else)."""
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        args = [str(self.binaries / "initdb"), "-D", str(self.data), "-U", SUPERUSER]
        args += ["-E", "UTF8", "--locale=C", "--auth=scram-sha-256", f"--pwfile={pwfile}"]
        proc = self._spawn(args, self.workdir / "initdb.log", env=dict(os.environ, LC_ALL="C"))
        if proc.wait(120) != 0:
            tail = (self.workdir / "initdb.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"initdb failed:\n{tail}")

    def _own(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 30.0) -> None:
        if self.alive():
            return
        args = [str(self.binaries / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        args += ["-k", str(self.workdir), "-c", "listen_addresses=127.0.0.1"]
        for setting in ("fsync=off", "full_page_writes=off", "shared_buffers=16MB"):
            args += ["-c", setting]
        self._proc = self._spawn(args, self.workdir / "postgres.log")
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.workdir / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)

    def ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        """A fast shutdown (SIGINT): every client is cut off at once."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, dbname: str, *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        """One statement outside a transaction (CREATE / DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        return name


def _user() -> str | None:
    """Who runs the server: this user, unless it is root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and neither a postgres nor a nobody user to run PostgreSQL")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL. A test that stops it must start it again before it ends."""
    binaries = server_binaries()
    pytest.importorskip("psycopg", reason="psycopg, the postgres extra, is not installed")
    # not under pytest's tmp_path: that is root's, mode 0700, where the server's user cannot go;
    # a short path too, as a unix socket's must be
    workdir = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
    cluster = PgCluster(binaries, workdir, _user())
    try:
        cluster._own(workdir)
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """postgresql://… of a new, empty database of the session's cluster; dropped afterwards."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    if pg_cluster.alive():
        pg_cluster.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
