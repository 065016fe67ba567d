"""A private MariaDB server for tests that kill, restart or freeze the database under a running ledger.

The shared server named by FLEDGER_TEST_MYSQL_URL must never be stopped; this one lives in a temporary data
directory on a free loopback port, as root with an empty password, and only the process it started is ever
signalled. Test modules use it with ``from privatedb import private_mariadb  # noqa: F401`` (a module-scoped
fixture); it fails when FLEDGER_REQUIRE_MYSQL=1 and the MariaDB binaries are missing, and skips otherwise.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from conftest import REQUIRE_MYSQL_VAR, free_port

START_TIMEOUT_S = 60.0   # the longest start() and restart() wait for the server to accept connections
STOP_TIMEOUT_S = 20.0    # the longest stop() waits after SIGTERM before SIGKILL
SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or next((str(Path(d) / name) for d in SEARCH if (Path(d) / name).is_file()), None)
        if found:
            return found
    return None


class PrivateMariaDB:
    """One mariadbd on a temporary data directory: ``start``, ``url``, ``kill``, ``restart``, ``freeze``,
    ``thaw``, ``stop``."""

    def __init__(self) -> None:
        self.install_db = _binary("mariadb-install-db", "mysql_install_db")
        self.server = _binary("mariadbd", "mysqld")
        self.port = 0
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.frozen = False

    @property
    def missing(self) -> str:
        """Which binaries are missing ("" if none)."""
        return ", ".join(name for name, path in (("mariadb-install-db", self.install_db), ("mariadbd", self.server))
                         if path is None)

    @property
    def datadir(self) -> Path:
        assert self.directory is not None, "start() the server first"
        return self.directory / "data"

    def start(self) -> None:
        """Create a fresh data directory and start the server on a free port; returns once it accepts
        connections."""
        if self.missing:
            raise RuntimeError(f"MariaDB binaries not found: {self.missing}")
        assert self.install_db is not None
        self.directory = Path(tempfile.mkdtemp(prefix="fledger-mariadb-"))
        self.port = free_port()
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        install = subprocess.run([self.install_db, "--no-defaults", f"--datadir={self.datadir}",
                                  "--auth-root-authentication-method=normal", *as_root],
                                 capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({install.returncode}): {install.stderr[-2000:]}")
        self._launch()

    def _launch(self) -> None:
        assert self.server is not None and self.directory is not None
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        with open(self.directory / "server.log", "ab") as out:
            self.process = subprocess.Popen(
                [self.server, "--no-defaults", *as_root, f"--datadir={self.datadir}", f"--port={self.port}",
                 f"--socket={self.directory / 'mysqld.sock'}", "--bind-address=127.0.0.1",
                 f"--pid-file={self.directory / 'mysqld.pid'}", f"--log-error={self.directory / 'error.log'}",
                 "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--performance-schema=OFF"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        self.frozen = False
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.process.returncode} while starting: {self._log()}")
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                                connect_timeout=1, read_timeout=2).close()
                return
            except pymysql.err.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd on port {self.port} did not accept connections within "
                                       f"{START_TIMEOUT_S:g} s ({exc}): {self._log()}") from exc
            time.sleep(0.1)

    def _log(self) -> str:
        path = self.directory / "error.log" if self.directory else None
        return path.read_text(errors="replace")[-2000:] if path and path.exists() else "(no error log)"

    def url(self, database: str) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{database}?charset=utf8mb4"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, sig: signal.Signals) -> None:
        if self.running:   # only ever the process this object started
            assert self.pid is not None
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server (a crash), and wait for it to exit."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        self.frozen = False

    def restart(self) -> None:
        """Start the server again on the same data directory and port (after ``kill``); returns once it accepts
        connections."""
        if self.running:
            raise RuntimeError("mariadbd is still running: kill() it first")
        self._launch()

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open, nothing answers."""
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        self._signal(signal.SIGCONT)
        self.frozen = False

    def ensure_up(self) -> None:
        """Thaw or restart the server, whatever a previous test left it in."""
        if self.frozen:
            self.thaw()
        if not self.running:
            self.restart()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and remove its data directory."""
        try:
            if self.running:
                assert self.process is not None
                self.thaw()
                self._signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """A private MariaDB server for the module (see PrivateMariaDB); each test should call ``ensure_up`` first."""
    db = PrivateMariaDB()
    if db.missing:
        message = f"MariaDB binaries not found ({db.missing}): cannot start a private server"
        if os.environ.get(REQUIRE_MYSQL_VAR) == "1":
            pytest.fail(f"{REQUIRE_MYSQL_VAR}=1 but {message}", pytrace=False)
        pytest.skip(message)
    try:
        db.start()
        yield db
    finally:
        db.stop()
