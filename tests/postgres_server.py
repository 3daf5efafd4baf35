"""A real PostgreSQL server for the tests, which a test can stop and restart,
and a TCP proxy in front of one that breaks a connection at a chosen moment.

The server is Debian's ``postgresql`` (``make test`` installs it), started
with ``initdb`` and ``pg_ctl`` on 127.0.0.1, a free port and a temporary
folder, as the ``postgres`` user when the tests run as root (PostgreSQL
refuses to run as root). Without it the tests that need it are skipped,
except on CI, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["CommitFault", "PostgresServer", "ProxyFault", "free_port", "postgres_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_bin(name: str) -> str | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; :meth:`stop` and
    :meth:`start` keep its data and port, so a client sees a restart."""

    def __init__(self) -> None:
        initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            if os.environ.get("CI") == "true":
                pytest.fail("PostgreSQL is missing on CI: make test should have installed it")
            pytest.skip("PostgreSQL is not installed (make test installs it)")
        self.pg_ctl = pg_ctl
        # Not under pytest's temporary folder: it is private to root, and the
        # server runs as the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="scrapy-speedup-postgres-"))
        self.data, sockets = self.root / "data", self.root / "sockets"
        sockets.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(sockets, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        subprocess.run([*self.as_user, initdb, "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True, timeout=60)
        self.options = (f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1"
                        " -c fsync=off")
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._pg_ctl("-o", self.options, "-w", "-t", "30", "-l", str(self.root / "server.log"),
                     "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients get "terminating connection due to administrator
        command"; ``immediate``: the server dies as if it crashed, and
        recovers at the next start."""
        self._pg_ctl("-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            if self.running:
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


class ProxyFault:
    """What the proxy does to the connection that sends a ``COMMIT``."""

    #: Forward the COMMIT, let the server commit, then close the client's
    #: socket before the answer reaches it: committed, and the client cannot know.
    DROP_ANSWER = "drop-answer"
    #: Close both sockets instead of forwarding the COMMIT: never committed.
    DROP_COMMIT = "drop-commit"
    #: Close the client's socket only, without forwarding the COMMIT: the
    #: server still holds the transaction open, as after a network cut it has
    #: not noticed yet.
    HALF_OPEN = "half-open"
    #: Keep the COMMIT and both sockets, and forward nothing more: the client
    #: waits for an answer that never comes (a server or network that hangs).
    HANG = "hang"


class CommitFault:
    """A TCP proxy to a PostgreSQL server that breaks, once, the first
    connection that sends ``COMMIT`` after :meth:`arm`; every other
    connection passes unchanged. ``with`` stops it and closes every socket."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._fault: str | None = None
        self._lock = threading.Lock()
        self.fired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._released = threading.Event()
        threading.Thread(target=self._accept, name="commit-fault-proxy", daemon=True).start()

    def dsn(self, dbname: str = "postgres") -> str:
        # sslmode=disable: the proxy reads the protocol in clear.
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def arm(self, fault: str) -> None:
        with self._lock:
            self._fault = fault
            self.fired.clear()

    def _take(self) -> str | None:
        with self._lock:
            fault, self._fault = self._fault, None
            return fault

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        try:
            self._relay_until_closed(client, server)
        except OSError:
            pass
        finally:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.close()

    def _relay_until_closed(self, client: socket.socket, server: socket.socket) -> None:
        while not self._closed:
            readable, _, _ = select.select([client, server], [], [], 0.2)
            for source in readable:
                data = source.recv(65536)
                if not data:
                    return
                if source is client and b"COMMIT" in data.upper():
                    fault = self._take()
                    if fault is not None:
                        self._break(fault, client, server, data)
                        return
                (server if source is client else client).sendall(data)

    def _break(
        self, fault: str, client: socket.socket, server: socket.socket, commit: bytes
    ) -> None:
        """Then the caller closes both sockets."""
        if fault == ProxyFault.DROP_ANSWER:
            server.sendall(commit)
            # The server's answer ends with ReadyForQuery ('Z', length 5, a
            # status byte): once it arrives the COMMIT is done server-side.
            answer = b""
            deadline = time.monotonic() + 30
            while b"Z\x00\x00\x00\x05" not in answer and time.monotonic() < deadline:
                chunk = server.recv(65536)
                if not chunk:
                    break
                answer += chunk
            self.fired.set()
        elif fault == ProxyFault.DROP_COMMIT:
            self.fired.set()
        elif fault == ProxyFault.HALF_OPEN:
            client.close()
            self.fired.set()
            self._released.wait()
        else:  # HANG: hold both sockets open until release() or close()
            self.fired.set()
            self._released.wait()

    def release(self) -> None:
        """Close the connection that HANG holds."""
        self._released.set()

    def close(self) -> None:
        self._closed = True
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> CommitFault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
