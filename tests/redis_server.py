"""A real Redis server for the tests: Debian's ``redis-server`` (``make
test`` installs it) on 127.0.0.1, a free port and a temporary folder; a test
can stop and restart it with its data (a machine sees a Redis restart)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres_server import free_port

__all__ = ["RedisServer", "redis_server"]


class RedisServer:
    """*durable*: every write in the append-only file, fsynced (the tests
    restart it with its data); otherwise in memory only (benchmarks).
    *password*: the server requires it (``requirepass``), and :attr:`url`
    carries it."""

    def __init__(self, durable: bool = True, password: str | None = None) -> None:
        self.durable = durable
        self.password = password
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is missing on CI: make test should have installed it")
            pytest.skip("redis-server is not installed (make test installs it)")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="scrapy-speedup-redis-"))
        self.port = free_port()
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--save", "", *(["--appendonly", "yes", "--appendfsync", "always"]
                             if self.durable else ["--appendonly", "no"]),
             *(["--requirepass", self.password] if self.password else []),
             "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                # Up, whether it answers or asks for the password first.
                if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start:\n"
                           + (self.root / "redis.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def redis_server(durable: bool = True, password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(durable, password)
    server.start()
    try:
        yield server
    finally:
        server.close()
